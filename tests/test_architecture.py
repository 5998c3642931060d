"""The shape of the package: model-kind knowledge lives in the backbone module only."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffalign"
MODEL_KIND = re.compile(r"is_sdxl|== \"sdxl\"|== 'sdxl'|text_encoder_2|StableDiffusionXLPipeline\b")
# models.py is the backbone; testing.py builds the tiny SD1.5/SDXL test models from their configs
ALLOWED = {"models.py", "testing.py"}


def test_model_kind_checks_live_in_the_backbone_only():
    found = [f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name not in ALLOWED
             for n, line in enumerate(path.read_text().splitlines(), 1) if MODEL_KIND.search(line)]
    assert not found, "model-kind checks outside diffalign/models.py:\n" + "\n".join(found)
