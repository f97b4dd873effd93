"""Language-model side of clt-eval: activation streaming, model loading, the spliced
replacement model and attribution graphs. Heavy libraries (transformer_lens, transformers)
are imported inside the functions that need them (GUIDE §7)."""
