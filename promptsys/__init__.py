"promptsys: take LLM prompts from notebook experiments to production services."
__version__ = "0.1.0"

# Light by design: `import promptsys` loads nothing but this file. Names resolve on first use, so a
# service that only runs a pipeline never pays for MLflow, pandas, matplotlib or llama.cpp.
_LAZY = {
    "Pipeline": "pipeline", "Result": "pipeline",
    "load_settings": "config", "get_settings": "config", "Settings": "config",
    "load_task": "prompts", "list_tasks": "prompts", "Task": "prompts", "PromptVersion": "prompts",
    "PromptsysError": "errors", "InputValidationError": "errors", "OutputValidationError": "errors",
    "ProviderError": "errors", "BudgetExceeded": "errors", "CircuitOpen": "errors", "PromptNotFound": "errors",
    "ConfigError": "errors", "TemplateError": "errors",
    "make_provider": "providers", "Request": "providers", "Completion": "providers",
    "evaluate": "evaluation", "compare": "evaluation", "load_dataset": "evaluation",
    "resolve_alias": "registry", "current_alias": "registry",
    "gate": "promotion", "promote": "promotion", "rollback": "promotion", "stage": "promotion", "history": "promotion",
    "record_feedback": "metrics", "summary": "monitor",
}

def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f"promptsys.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'promptsys' has no attribute {name!r}")

def __dir__(): return sorted([*globals(), *_LAZY])
