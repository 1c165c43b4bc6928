"""Chat with a gpt-moe checkpoint in the browser (Gradio).

    python app.py [--checkpoint PATH] [--host 127.0.0.1] [--port 7860] [--share]

Without --checkpoint it serves the newest complete checkpoint under runs/. The page streams
replies, has a Stop button and sampling settings, shows the model's facts and, for the last
reply, which experts every generated token was routed to. The logic is in gpt_moe/serve/chat_app.py.
"""

import sys

from gpt_moe.serve.chat_app import main

if __name__ == "__main__":
    sys.exit(main())
