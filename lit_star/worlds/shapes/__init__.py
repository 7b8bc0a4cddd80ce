"""The Shapes world (``docs/shapes_world.md``), in one place.

* :mod:`~lit_star.worlds.shapes.world`: vocabulary, scenes, geometry, rendering and the world's language;
* :mod:`~lit_star.worlds.shapes.generator`: sampling of prompts, questions, edits and riddles; writing the
  webdataset shards and the eval sets (``python -m lit_star data shapes``);
* :mod:`~lit_star.worlds.shapes.scorer`: ShapesEval's learned-model-free detector and GenEval-style and
  edit scoring (the command, which can also generate first, is ``python -m lit_star eval shapes``).
"""
