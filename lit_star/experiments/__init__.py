"""Research probes: one-off analyses behind the findings in ``docs/`` (not part of the product CLI).

Each is a module with its own command line, for example::

    python -m lit_star.experiments.grid_probe --base runs/shapes/stage0_base/hf
    python -m lit_star.experiments.prompt_probe --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt
    python -m lit_star.experiments.code_loss --ckpt runs/shapes/stage2_stacked_ar/checkpoints/last.ckpt \\
        --shards 'runs/shapes_world/t2i_codes/val-*.tar'

Experiments may import the core; the core never imports them (torchtitan's rule).
"""
