"""The console chat: talk to a steered model in a terminal.

    python demo.py                                      # interactive chat, demo.yaml's default profile
    python demo.py --help                               # the options and the profile's features
    python demo.py --steer eiffel_tower 0.5 clamp       # chat, steered from the start (op optional)
    python demo.py --prompt "Tell me about Paris" --steer eiffel_tower 0.5 --temperature 0 --max-new-tokens 48
    python demo.py --prompt "Tell me about Paris" --steer eiffel_tower 0.5 --compare
    python demo.py --profile llama31_8b --steer 15:21576 0.5    # an SAE feature, extracted on demand

`--steer NAME [STRENGTH] [add|clamp]` (repeatable) takes the same words as the chat's /steer:
a strength is a fraction of the layer's typical residual norm (0.5 = half; negative steers
away), the unit of the app's slider, and each feature uses its own op (add or clamp) unless
a third word names one. A feature given without a strength is steered by auto (the way to steer
picked for each answer, calibrate.auto_answer) where the profile says so (generation.auto, true on
the embedded profile), else at its default. In the chat, type /help for the commands (/temperature, /max-tokens
and /settings change and show the generation settings); exit, quit or Ctrl-D end it, Ctrl-C
stops an answer. With --prompt it prints only the answer and exits (0, or 2 for bad input,
with one line saying why). What a key, a strength or a long message means is decided by
`catalog.py`, the same for the app and the console.

Every answer is kept with the steering it was made with (`/save-chat FILE` writes them as
JSON). When the steering changes, the model reads only the earlier turns answered with the
steering now in force (`/history same`, the default) or all of them (`/history all`, with a
notice), and compare's unsteered side reads only unsteered turns: `chat_history.py` decides.

--help and the chat's first line come before torch is imported (`console_cli.py`, light).
"""

import sys

from llm_steering.console import cli

if __name__ == "__main__":
    cli.before_loading(sys.argv[1:])  # before the heavy imports: --help, and the first line, come at once
    from llm_steering.console.chat import main

    sys.exit(main())
