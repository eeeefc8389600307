"""The Qwen2 network (`qwen2`), its layers (`layers`) and how its weights get onto a device (`loader`)."""
