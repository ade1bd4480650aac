"""What reproduce.py runs: the paper's comparison as a pipeline of the real scripts, one subprocess a step.

    config.py     the command line: flags, checks before anything runs (validate -> Config), constants
    plan.py       the steps (Step) and their command lines and order (Plan)
    manifests.py  when a step is finished, and with what (stage.json, started.json); JSON and git helpers
    progress.py   timestamped lines and a step's epoch, score and ETA from its output (Printer, Progress)
    runner.py     a step in a subprocess with its log (Runner), the steps in order, --jobs at once (execute)
    locks.py      one pipeline per step folder: locks naming a live process or SLURM job (StepLocks)
    slurm.py      --launcher slurm: checks, one submitit executor per step, the plan submitted with dependencies
    job.py        what a step's SLURM job runs (StepJob): the script per task, its manifest, requeue on a stop signal
    follow.py     following the jobs: states, progress from the logs, failures, cancelling what depends on them
    report.py     the table (table.md, table.json) and the trivial all-object scores
    significance.py  each cell's interval, the paired differences, breakdown.md (from lib.evaluation)
    plot.py       the scores plot (scores.png): test oIoU per share with intervals
    figure.py     the qualitative figure (figure.png)
    main.py       the pipeline end to end (main), --fresh (clear_outputs), the entry point (cli)
"""
