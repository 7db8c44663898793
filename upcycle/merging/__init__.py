"""The pieces of `upcycle merge`: reading a MoE (source), merge arithmetic (methods), expert grouping
(grouping) and the model card (card). `upcycle.merge` puts them together."""
