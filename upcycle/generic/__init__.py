"""The generic MoE format: any Hugging Face model with its FFNs replaced by `upcycle.moe.MoE` blocks."""

from upcycle.generic.convert import convert_generic
from upcycle.generic.load import load
from upcycle.generic.modeling import install_moe, upcycled_class
from upcycle.generic.sites import FFN_SITES, FFNSite, find_sites, site_for

__all__ = ["FFN_SITES", "FFNSite", "convert_generic", "find_sites", "install_moe", "load", "site_for", "upcycled_class"]
