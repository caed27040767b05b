"""Regenerate ``models/param_counts.py``: the parameter count of every zoo entry, counted on the meta device.

``vitadapter configs list`` reads counts from that table (instant) when the entry's config digest matches,
and counts on the meta device otherwise; a test keeps the table equal to fresh counts.

Run: ``python tools/update_param_counts.py``.
"""

from __future__ import annotations

from pathlib import Path

import models
from models.param_counts import config_digest

OUT = Path(__file__).resolve().parents[1] / "models" / "param_counts.py"


def main() -> None:
    rows = []
    for name in models.list_configs(extensions=True):
        config = models.get_config(name)
        rows.append(f'    "{name}": ("{config_digest(config)}", {models.count_parameters(config)}),')
    text = OUT.read_text()
    head, _, _ = text.partition("COUNTS: dict[str, tuple[str, int]] = {")
    OUT.write_text(head + "COUNTS: dict[str, tuple[str, int]] = {\n" + "\n".join(rows) + "\n}\n")
    print(f"wrote {len(rows)} counts to {OUT}")


if __name__ == "__main__":
    main()
