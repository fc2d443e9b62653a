"""An OpenAI-compatible HTTP server for steered answers, on the vLLM backend (steering_vllm.py).

    python serve.py                                   # the embedded model, http://127.0.0.1:8000/v1
    python serve.py --model meta-llama/Llama-3.1-8B-Instruct --vectors steering_vectors_llama31_8b.pt \
        --tensor-parallel-size 2

Any OpenAI client works; the steering goes in the request body as `steering`, in the export
format of the app and of `steering.save_steering_spec` (strength = fraction x the layer's norm):

    client.chat.completions.create(model="default", messages=[...], stream=True, temperature=0,
        extra_body={"steering": {"format": "llm-steering/spec", "version": 1, "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                 "steer_prompt": True, "features": [{"key": "pirate", "fraction": 0.2, "mode": "clamp"}]}})

Endpoints: GET /v1/models, POST /v1/chat/completions (streamed with "stream": true). A malformed
spec or bad parameter is a 400 with a one-line message; the server keeps serving. Closing the
connection of a streamed answer aborts the request in the engine.
"""

from llm_steering.serve import main

if __name__ == "__main__":
    main()
