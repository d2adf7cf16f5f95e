"""Online reinforcement learning (GRPO) as a task: rollouts from the current policy feed the one loop."""
