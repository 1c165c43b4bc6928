"""The training wing: the plan of a run (every resolved value before anything starts), the DeepSpeed engine, expert
parallelism, the Trainer and the parts it hands off to (checkpointer, monitor, evaluator)."""
