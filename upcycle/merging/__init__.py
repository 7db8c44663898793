"""The pieces of `upcycle merge`: reading a MoE (source), the base FFN of task vectors (base),
calibration runs (calibrate), merge arithmetic and method names (methods), expert grouping
(grouping), the tensor plan and per-layer computation (plan) and the model card (card).
`upcycle.merge` puts them together."""
