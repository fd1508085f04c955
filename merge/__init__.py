"""Stage III: merge experts of one seed into one model.

Models are directories holding `config.json` and one `model.safetensors`.

- `weights`: parse `--weights math=0.35,17=0.5`.
- `methods`: `MERGE_METHODS` by name and `merge_models(...)`, the one entry point.
- `linear`: our streaming θ = Σ λ_i θ_i; `mergekit_methods`: mergekit's methods with the seed as base.
- `recipe`: the mergekit-style YAML + model card of a merge, and `run_recipe` to reproduce one.
- `members`: patch / replace as pure functions over a composition's member list.
- `operations`: compose / patch / replace on the registry (merge, gate, register, record);
  `gate`: cached per-domain quick-eval metrics and the gate's references; `search`: merge weights
  on the simplex within a budget of evaluations.
- `checkpoint`, `safetensors_io`, `xlstm_student.json`: model dirs, checks, streaming I/O, and the
  student's architecture as mergekit reads it.
"""
