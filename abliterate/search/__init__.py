"""Stage 6, search: many candidate plans tried on one loaded model. `space` turns a few parameters into a Plan,
`trial_edits.TrialEditor` applies it in place with the streaming ablation's role table and edit math and undoes it
bit for bit (restoring from the checkpoint, `original_weights`), `objectives` scores refusals and KL (answers from
`generation`, stopped early), `one_pass` scores a trial in one forward pass (its KL and a predicted refusal rate)
and `fidelity` decides which trials are confirmed by generation, `study` runs the Optuna study and picks the plan,
`report` writes what was found; `runner` ties one run together."""
