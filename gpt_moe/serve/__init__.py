"""The serving wing: generation (sampling, streaming, speculative decoding), chat replies with their routing, the
Gradio app and the chat evaluation."""
