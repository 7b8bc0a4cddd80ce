"""Dataset jobs: ``python -m lit_star data shapes --out runs/shapes_world``."""

from lit_star.commands._dispatch import dispatch

DATASETS = {
    "shapes": ("Generate the procedural Shapes world (webdataset shards + eval sets).", "lit_star.worlds.shapes.generator:main"),
}


def main(argv: list[str]) -> int:
    return dispatch("data", DATASETS, argv)
