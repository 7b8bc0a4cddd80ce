"""Generation as pure functions: KV-cached decoding, guidance, filtering, and the four sampling modes.

- :mod:`lit_star.sampling.filtering`: ``SamplerConfig``, guidance mix, top-k-first filtering, seeded sampling.
- :mod:`lit_star.sampling.decoding`: the cached decode loop over base + stack (and its uncached reference).
- :mod:`lit_star.sampling.modes`: text-to-image, editing, understanding, implicit reasoning; codes to images.
- :mod:`lit_star.sampling.loading`: ``load_star(ckpt)`` for our checkpoints and imported releases.
"""
