"""Language-model side of clt-eval: activation streaming, model loading, the spliced
replacement model and attribution graphs. Heavy libraries (transformer_lens, transformers)
are imported inside the functions that need them (docs/concepts.md §7)."""
