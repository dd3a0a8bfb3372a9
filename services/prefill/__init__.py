"""The prefill service: computes prompts' KV, samples their first token and pushes both to decode workers."""
