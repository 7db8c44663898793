"""The generic format's model classes: a stock transformers class whose FFN sites hold `MoE` blocks.

A generic checkpoint is the source model's config.json plus an ``upcycle`` section that says where
the FFNs are and how the MoE blocks are built, the MoE weights under the replaced module names,
and a modeling file whose classes subclass the stock ones and call `install_moe` after the stock
``__init__``. `upcycled_class` builds the same classes in-process for `upcycle.load`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from upcycle.errors import UpcycleError
from upcycle.generic.sites import FFNSite, find_sites
from upcycle.moe import MoE, read_dense_ffn

__all__ = [
    "FORMAT",
    "MODELING_FILE",
    "auto_classes",
    "install_moe",
    "modeling_source",
    "moe_like",
    "replace_sites",
    "upcycled_class",
]

FORMAT = "generic"
MODELING_FILE = "modeling_upcycle.py"
CLASS_PREFIX = "Upcycled"

# Auto class -> the transformers table of its class names per model_type, most specific first.
_AUTO_TABLES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForPreTraining", "MODEL_FOR_PRETRAINING_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def block_options(section: dict) -> dict:
    """Return the `MoE` keyword arguments an ``upcycle`` config section records."""
    return {
        "num_experts": section["num_experts"],
        "top_k": section["top_k"],
        "router": section["router"],
        "router_options": dict(section.get("router_options") or {}),
        **dict(section.get("block_options") or {}),
    }


def moe_like(ffn: nn.Module, options: dict) -> MoE:
    """Return a `MoE` shaped for the dense ``ffn`` (same sizes, activation, GLU or not, biases, dtype),
    with freshly initialised weights; loading fills them in.

    Raises:
        UpcycleError: the FFN's layout is unknown or an option is invalid.
    """
    dense = read_dense_ffn(ffn)
    options = dict(options)
    return MoE(
        dense.hidden_size,
        dense.intermediate_size,
        options.pop("num_experts"),
        options.pop("top_k"),
        activation=dense.activation,
        gated=dense.gated,
        bias=dense.in_bias is not None or dense.down_bias is not None,
        **options,
    ).to(dtype=dense.down_weight.dtype)


def replace_sites(model: nn.Module, site: FFNSite, make_moe: Callable[[nn.Module], MoE]) -> list[str]:
    """Replace every FFN ``site`` matches in ``model`` by ``make_moe(ffn)`` (and a split FFN's down
    projection by an identity); return the replaced module names.

    Raises:
        UpcycleError: no FFN matches.
    """
    names = []
    for found in find_sites(model, site):
        moe = make_moe(found.ffn)
        model.set_submodule(found.name, moe)
        if found.down_name is not None:
            model.set_submodule(found.down_name, nn.Identity())
        names.append(found.name)
    return names


def install_moe(model: nn.Module, section: dict) -> list[str]:
    """Turn a freshly built stock model into its generic MoE form as its ``upcycle`` section says.

    Returns:
        The names of the modules now holding a `MoE`.

    Raises:
        UpcycleError: the section is not a generic one, or the model's FFNs do not match it.
    """
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise UpcycleError(
            "this config has no generic `upcycle` section; was it written by `upcycle convert --target generic`?"
        )
    site = FFNSite(section["ffn_pattern"], section.get("ffn_down"))
    options = block_options(section)
    names = replace_sites(model, site, lambda ffn: moe_like(ffn, options))
    if len(names) != section["num_moe_layers"]:
        raise UpcycleError(
            f"{type(model).__name__} has {len(names)} FFNs matching {site.pattern!r} but the checkpoint has "
            f"{section['num_moe_layers']} MoE layers; load it with the class it was converted from"
        )
    return names


_CLASSES: dict[type, type] = {}


def upcycled_class(base: type) -> type:
    """Return the generic MoE subclass of the stock transformers class ``base`` (made once, then cached)."""
    if base not in _CLASSES:

        def __init__(self, config, *args, **kwargs):  # noqa: N807 - the class's constructor
            base.__init__(self, config, *args, **kwargs)
            install_moe(self, getattr(config, "upcycle", None))

        _CLASSES[base] = type(
            f"{CLASS_PREFIX}{base.__name__}",
            (base,),
            {"__init__": __init__, "__module__": __name__, "__doc__": f"{base.__name__} with upcycle MoE FFNs."},
        )
    return _CLASSES[base]


def auto_classes(model_type: str, architecture: str) -> dict[str, str]:
    """Return ``{auto class: stock class name}`` for the Auto classes that should load a generic
    checkpoint of ``architecture``: the one that maps ``model_type`` to it, and ``AutoModel`` (the
    base model).
    """
    from transformers.models.auto import modeling_auto

    found = {}
    for auto_name, table_name in _AUTO_TABLES:
        class_name = getattr(modeling_auto, table_name, {}).get(model_type)
        if isinstance(class_name, str) and (class_name == architecture or auto_name == "AutoModel"):
            found[auto_name] = class_name
    return found


def modeling_source(classes: dict[str, str]) -> str:
    """Return the text of the modeling file for ``{auto class: stock class name}``."""
    stock = sorted(set(classes.values()))
    lines = [
        '"""Generic upcycled MoE model, written by upcycle (https://pypi.org/project/upcycle/).',
        "",
        "Each class is the stock transformers class with its FFNs replaced by upcycle's MoE block, as the",
        "`upcycle` section of config.json describes. Loading needs the `upcycle` package (pip install upcycle):",
        "",
        "    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)   # or upcycle.load(path)",
        '"""',
        "",
        f"from transformers import {', '.join(stock)}",
        "",
        "from upcycle.generic.modeling import install_moe",
    ]
    for name in stock:
        lines += [
            "",
            "",
            f"class {CLASS_PREFIX}{name}({name}):",
            f'    """{name} with upcycle MoE FFNs."""',
            "",
            "    def __init__(self, config, *args, **kwargs):",
            "        super().__init__(config, *args, **kwargs)",
            "        install_moe(self, config.upcycle)",
        ]
    return "\n".join(lines) + "\n"
