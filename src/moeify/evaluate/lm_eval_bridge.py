"""EleutherAI lm-evaluation-harness on a (stock transformers) checkpoint."""

from pathlib import Path

from moeify.errors import MoeifyError
from moeify.evaluate.models import resolve_eval_model


def run_lm_eval(model: str, tasks: list[str], include: Path | None = None, limit: int | None = None,
                batch_size: int = 1, device: str = "cpu") -> dict[str, dict]:
    """{task: {metric: value}}. `include` adds a folder of task YAMLs (local tasks, no hub needed)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MoeifyError("the lm-eval bridge needs lm-evaluation-harness; pip install 'lm-eval>=0.4.5'") from None
    path = resolve_eval_model(model)
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MoeifyError(f"lm-eval has no task {', '.join(unknown)}; list them with `lm-eval ls tasks` or add --lm-eval-include DIR")
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32", tasks=tasks,
                                      task_manager=manager, device=device, batch_size=batch_size, limit=limit)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))} for task, metrics in results["results"].items()}
