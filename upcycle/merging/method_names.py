"""The merge methods' names and the facts about them that need no tensors (so the CLI can list them
without importing torch)."""

METHODS = ("average", "frequency", "router-weight", "task-arithmetic", "ties", "dare", "concat", "select")
TASK_VECTOR_METHODS = ("task-arithmetic", "ties", "dare")
NEEDS_CALIBRATION = ("frequency", "router-weight", "select")
DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.5}  # TIES keeps the top 20% (Yadav et al.); DARE drops half
