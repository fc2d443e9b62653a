"""The Space: a chat with a language model that you steer with SAE features, in the browser.

    python app.py                                   # embedded SmolLM2-135M-Instruct, CPU, offline
    STEERING_PROFILE=llama31_8b python app.py       # Llama-3.1-8B-Instruct with the reference's SAE features
    python app.py --port 7861 --host 0.0.0.0        # another port / listen on every interface

The model profile (a profile of demo.yaml) comes from the STEERING_PROFILE environment
variable, so a Space chooses its model with a Space variable, not by editing code. Other
variables: STEERING_CONFIG (the demo.yaml to read), STEERING_CONCURRENCY (answers generated
at the same time, default 4), and STEERING_MODEL / STEERING_SAE_SOURCE / STEERING_VECTORS to
point the profile at local directories. Call it from Python (see the README):

    >>> from gradio_client import Client
    >>> Client("http://127.0.0.1:7860/").predict("Hi!", steering_spec="Eiffel Tower", api_name="/chat")
"""

import spaces  # noqa: F401  (first: on a ZeroGPU Space it must be imported before torch)

from llm_steering.web.app import main

if __name__ == "__main__":
    main()
