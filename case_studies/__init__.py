"""Built-in case studies. Each registers in the ``clt_eval.case_studies`` entry-point group
of the project's pyproject.toml, exactly as an external plugin package does."""
