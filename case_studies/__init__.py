"""Built-in case studies. Importing this package registers them (by name only: the modules
load, with their model libraries, when a case study is first used)."""

from clt_eval.case_study import register_case_study

register_case_study(
    "boolean_two_step",
    "case_studies.boolean_two_step:BooleanTwoStep",
    "4 Boolean inputs -> 4 half-XORs (layer 0) -> AND of the two XORs (layer 1); GUIDE §4",
)
