"""In-context-learning tasks (`tasks`): the task formats, prompts, batches and judging that eval/ runs
on a model and training/ runs as Composer evaluators."""
