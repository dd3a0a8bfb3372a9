"""The in-process inference engine: scheduler, paged latent KV cache, model runner, sampling."""
