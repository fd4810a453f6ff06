"""What an SVD adapter changed: spectra, attention heads, and named concepts.

```python
from peft_svd.analysis import analyze_adapter, default_descriptions, write_report

analysis = analyze_adapter(peft_model, tokenizer, descriptions=default_descriptions() + class_prompts)
print("\\n".join(analysis.summary_lines()))
write_report(analysis, "report/")
```

The building blocks work on plain tensors as well: ``head_shares`` / ``head_change`` attribute a
change of singular values to attention heads, ``joint_space_map`` / ``name_directions`` name
residual-stream directions with a ``ConceptPool`` of encoded descriptions.
"""

from .describe import (
    ConceptPool,
    concept_change,
    concept_energy,
    default_descriptions,
    joint_space_map,
    name_directions,
    read_descriptions,
)
from .heads import HeadChange, attention_head_changes, head_change, head_shares
from .report import write_report
from .spectral import LayerChange, parse_layer_name, spectral_change, summarize
from .summary import AdapterAnalysis, analyze_adapter, encode_pool

__all__ = [
    "AdapterAnalysis",
    "ConceptPool",
    "HeadChange",
    "LayerChange",
    "analyze_adapter",
    "attention_head_changes",
    "concept_change",
    "concept_energy",
    "default_descriptions",
    "encode_pool",
    "head_change",
    "head_shares",
    "joint_space_map",
    "name_directions",
    "parse_layer_name",
    "read_descriptions",
    "spectral_change",
    "summarize",
    "write_report",
]
