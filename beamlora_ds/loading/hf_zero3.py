"""Loading a transformers model under ZeRO-3: transformers partitions it while it loads (zero.Init) only while an
`HfDeepSpeedConfig` is alive, and keeps just a weak reference to it, so the loader keeps one referenced."""
from __future__ import annotations

_live_configs: list = []  # HfDeepSpeedConfig objects that must stay referenced while ZeRO-3 models load


def enable_zero3_loading(ds_config: dict) -> None:
    """Make the next `from_pretrained` calls partition under ZeRO-3 as `ds_config` says (docs/platform.md,
    "HfDeepSpeedConfig before from_pretrained")."""
    from transformers.integrations import HfDeepSpeedConfig

    _live_configs.append(HfDeepSpeedConfig(ds_config))
