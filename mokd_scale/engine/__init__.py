"""One network's training machinery: its DeepSpeed engine, optimizer and parameter groups, gradient gate,
fp32 EMA teacher (the Learner)."""
