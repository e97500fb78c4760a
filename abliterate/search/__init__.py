"""Stage 5, search: many candidate plans tried on one loaded model. `trial_edits.TrialEditor` applies a plan in
place with the streaming ablation's role table and edit math and undoes it bit for bit (restoring from the
checkpoint, `original_weights`), so that each trial scores exactly the model sharded_ablate would write."""
