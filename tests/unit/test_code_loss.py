"""eval code-loss: the regions of a Shapes image's codes and the per-region loss."""

from __future__ import annotations

from collections import Counter

import torch

from lit_star.experiments.code_loss import REGIONS, code_loss_by_region, code_regions, format_code_loss
from lit_star.models.sequence_layout import collate_padded
from tests.stage2_fixtures import build_micro_star

CAPTIONS = ["a red circle", "a blue square", "two green triangles"]


def test_code_regions_follow_the_box_in_raster_order():
    # 64 px, 16 x 16 codes of 4 px: the box spans patch rows 4-6 and columns 2-4 (x1 = 20 ends on a
    # patch border, so column 5 is not touched).
    regions = code_regions([{"bbox": [9.0, 17.0, 20.0, 27.0]}], grid=16, resolution=64)
    assert Counter(regions) == {"object start": 1, "object": 8, "ring 1": 16, "ring 2": 24, "background": 207}
    grid = [regions[i * 16 : (i + 1) * 16] for i in range(16)]
    assert grid[4][2] == "object start" and grid[6][4] == "object" and grid[4][5] == "ring 1"
    assert grid[2][0] == "ring 2" and grid[1][2] == "background"
    # A second object: its own start, and the rings never overwrite an object.
    two = code_regions([{"bbox": [9.0, 17.0, 20.0, 27.0]}, {"bbox": [40.0, 40.0, 52.0, 52.0]}], grid=16, resolution=64)
    assert Counter(two)["object start"] == 2 and two[10 * 16 + 10] == "object start"


def test_region_losses_add_up_to_the_training_loss():
    star = build_micro_star(CAPTIONS * 20, codebook_size=16, codebook_dim=8, image_size=8)
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 4, 4), generator=generator)  # 2x VQ: 4 x 4 codes of 2 px
    metas = [{"objects": [{"bbox": [2.0, 2.0, 5.0, 5.0]}]}, {"objects": []},
             {"objects": [{"bbox": [0.0, 0.0, 2.0, 2.0]}, {"bbox": [6.0, 6.0, 8.0, 8.0]}]}]
    batches = [{"caption": CAPTIONS[:2], "codes": codes[:2], "meta": metas[:2]},
               {"caption": CAPTIONS[2:], "codes": codes[2:], "meta": metas[2:]}]
    results = code_loss_by_region(star, batches)
    assert results["images"] == 3 and sum(results[r]["codes"] for r in REGIONS) == 3 * 16
    # The count-weighted region means are the training objective's mean image-token loss.
    with torch.no_grad():
        for unconditional, key in ((False, "loss"), (True, "loss_unconditional")):
            batch = collate_padded([star.layout.text_to_image(c, x, unconditional=unconditional)
                                    for c, x in zip(CAPTIONS, codes)], star.layout.special.pad)
            embeds = star.model.embed_inputs(batch.input_ids, batch.code_mask, star.codebook(batch.code_ids))
            expected = star.model.image_token_loss(star.model(embeds, batch.position_ids, batch.attention_mask), batch.labels)
            weighted = sum(results[r][key] * results[r]["codes"] for r in REGIONS) / (3 * 16)
            assert abs(weighted - float(expected)) < 1e-5
    assert abs(sum(results[r]["share_of_loss"] for r in REGIONS) - 1.0) < 1e-9
    # The limit stops after that many images.
    assert code_loss_by_region(star, batches, limit=1)["images"] == 1
    assert "object start" in format_code_loss(results)
