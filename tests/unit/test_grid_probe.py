"""eval grid-probe: the linear probe itself, the token bookkeeping on a micro base, and the command."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lit_star.worlds.shapes.generator import random_scene
from lit_star.worlds.shapes.world import object_center
from lit_star.experiments import grid_probe
from lit_star.models.base_vlm import load_base_vlm, load_processor
from tests.stage2_fixtures import write_micro_base


def test_linear_probe_reads_a_linear_code_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=generator)
    noise = torch.randn(600, 16, generator=generator)
    coded = noise.clone()
    coded[:, 5] += 4.0 * labels  # the label along one direction, well above the noise
    train = torch.arange(600) < 420
    assert grid_probe.linear_probe_accuracy(coded, labels, train) > 0.95
    assert grid_probe.linear_probe_accuracy(noise, labels, train) < 0.5
    with pytest.raises(ValueError, match="both sides"):
        grid_probe.linear_probe_accuracy(noise, labels, torch.ones(600, dtype=torch.bool))


@pytest.fixture(scope="module")
def micro_base(tmp_path_factory):
    return write_micro_base(tmp_path_factory.mktemp("grid_probe") / "base")


def test_image_tokens_are_collected_with_their_grid_place(micro_base):
    model, processor = load_base_vlm(micro_base).eval(), load_processor(micro_base)
    scenes = [random_scene(random.Random(seed)) for seed in range(5)]
    states, rows, columns, occupied, image_index = grid_probe.collect_image_token_states(model, processor, scenes,
                                                                                         batch_size=2)
    # The micro flavour: a 64 px image in 8 px patches, 2 x 2 merged, is a 4 x 4 token grid.
    tokens = 16
    assert states.shape == (model.config.text_config.num_hidden_layers + 1, 5 * tokens, model.config.text_config.hidden_size)
    assert rows.tolist() == [k // 4 for k in range(tokens)] * 5 and columns.tolist() == [k % 4 for k in range(tokens)] * 5
    assert image_index.tolist() == [i for i in range(5) for _ in range(tokens)]
    for i, scene in enumerate(scenes):
        expected = {(int(y * 4 / 64), int(x * 4 / 64)) for x, y in (object_center(o, 64) for o in scene.objects)}
        mask = image_index == i
        found = {(int(r), int(c)) for r, c, o in zip(rows[mask], columns[mask], occupied[mask]) if o}
        assert found == expected


def test_grid_probe_command_prints_every_layer_and_writes_json(micro_base, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert grid_probe.run(base=str(micro_base), images=20, out=str(out)) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert [entry["where"] for entry in results["layers"]] == ["vision output", "after decoder layer 1",
                                                              "after decoder layer 2"]
    assert results["chance"] == 0.25 and results["object_tokens"] > 0 and results["empty_tokens"] > 0
    for entry in results["layers"]:
        assert entry["where"] in printed
        assert all(0.0 <= entry[k] <= 1.0 for k in ("object_row", "object_column", "empty_row", "empty_column"))
    with pytest.raises(ValueError, match="at least 4"):
        grid_probe.run(base=str(micro_base), images=2)
