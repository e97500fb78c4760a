"""The one-command workflow (`abliterate run`): measure -> analyze -> search (or analyze's suggestion) ->
sharded_ablate -> evaluate against the base, in one output folder, resumable stage by stage.

  passthrough  splits `--<stage>-<flag>` options into each stage's own arguments
  stamps       the per-stage record of what was done (a hash of inputs and options), written last, atomically
  runner       decides per stage: reuse, resume or redo; runs the stage; writes its stamp
  summary      the closing report: before/after table, the plan, where everything is, how to chat with it

The stages' work is done by the same functions the single commands use; the command module
(abliterate.commands.run) hands them in, so this package imports no command.
"""
