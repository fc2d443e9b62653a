"""vLLM's own OpenAI-compatible server with per-request steering (docs/serving.md).

    python serve.py                                   # the embedded model, http://127.0.0.1:8000/v1
    python serve.py --port 8001 --dtype bfloat16      # any other option goes to vLLM's server
    python serve.py --model meta-llama/Llama-3.1-8B-Instruct --vectors steering_vectors_llama31_8b.pt \
        --tensor-parallel-size 2

A thin launcher: it runs vLLM's server (`python -m vllm.entrypoints.openai.api_server`, i.e.
`vllm serve`) on the embedded model's converted directory, in the dtype the library loads it in
(float32 on a CPU), with the project's worker extension and steering middleware. Any OpenAI
client works; the steering goes in the request body as `steering`, in the export format of the
app and of `steering.save_steering_spec` (strength = fraction x the layer's norm):

    client.chat.completions.create(model="default", messages=[...], stream=True, temperature=0,
        extra_body={"steering": {"format": "llm-steering/spec", "version": 1, "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                 "steer_prompt": True, "features": [{"key": "pirate", "fraction": 0.2, "op": "clamp"}]}})

Everything else is vLLM's: /v1/chat/completions, /v1/completions, /v1/models, /health,
/version, /metrics, /tokenize, usage, finish reasons, n, stop, logprobs, sampling options,
error objects, aborting requests whose client left. A bad spec or field is a 4xx for that
request only; bodies over --max-body-bytes (1 MiB) are a 413.
"""

from llm_steering.serve import main

if __name__ == "__main__":
    main()
