"""Options shared by several commands (run and sweep above all), declared once."""

import typer

# None means: the sweep file's value, else the default of skipbench.spec.Setup.

ModelOpt = typer.Option(None, "--model", "-m", help="Hub id, local dir, synthetic:<preset>[?agree=E&layers=N&seed=S], "
                        "or smollm2-135m (default).")
PromptOpt = typer.Option(None, "--prompt", "-p", metavar="<str>", help="A prompt text (repeatable).")
NumSamplesOpt = typer.Option(None, "--num-samples", "-n", help="Prompts to take (seeded choice).")
SeedOpt = typer.Option(None, "--seed", help="Seed for prompt choice and sampling (default 0).")
NShotOpt = typer.Option(None, "--n-shot", help="Solved examples prepended (cnn_dm).")
TemplateOpt = typer.Option(None, "--template", help='Wrap every prompt, e.g. "[INST] {prompt} [/INST]".')
MaxPromptOpt = typer.Option(None, "--max-prompt-tokens", help="Longest prompt in tokens.")
PolicyOpt = typer.Option(None, "--prompt-policy", help="Longer prompts: 'left' cuts from the left (default), "
                         "'refuse' fails.")
DATA_DIR_HELP = "Local copies of the datasets: DIR/<task>/<split>.jsonl"
DataDirOpt = typer.Option(None, "--data-dir", envvar="SKIPBENCH_DATA_DIR", help=f"{DATA_DIR_HELP} (see skipbench "
                          f"datasets).")
MaxNewOpt = typer.Option(None, "--max-new-tokens", help="Tokens to generate (default: the task's; 128 for --prompt).")
StopOpt = typer.Option(None, "--stop", metavar="<str>", help="A stop sequence (repeatable; default: the task's).")
SampleOpt = typer.Option(None, "--sample/--greedy", help="Sample instead of greedy decoding (default greedy).")
TemperatureOpt = typer.Option(None, "--temperature", help="Sampling temperature (default 1.0).")
TopPOpt = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 1.0).")
DtypeOpt = typer.Option(None, "--dtype", help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16.")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu or cuda.")
WarmupOpt = typer.Option(None, "--warmup", help="Uncounted generations per cell before timing (default 1).")
RepeatsOpt = typer.Option(None, "--repeats", help="Timed rounds per cell, interleaved with the baseline (default 3).")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads for torch (default: half the cores).")
ExecuteOpt = typer.Option(None, "--execute-code/--no-execute-code",
                          help="Run HumanEval completions against their tests (pass@1) in a sandbox.")
CompileOpt = typer.Option(False, "--compile", help="Run skipbench's engine with static shapes and torch.compile "
                          "(one graph per pass shape, rows x positions, shared by every layer and exit): the 'native' "
                          "backend becomes 'compiled'. Compile time is reported apart, never inside a cell's time.")
UncontainedOpt = typer.Option(False, "--execute-code-uncontained",
                              help="Where no namespace sandbox is available, run model-written code with only "
                                   "resource limits: it can read and write your files and use the network.")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (default: derived from the setup, so rerunning the "
                      "same command resumes).")
ForceOpt = typer.Option(False, "--force", help="Delete the run directory's cells and start over.")
LauncherOpt = typer.Option(None, "--launcher", help="Where cells run: local (this process; default), ray (a worker "
                           "per GPU of a Ray cluster, or a local cluster if none runs) or slurm (array tasks via "
                           "submitit). Needs pip install 'skipbench[ray]' or 'skipbench[slurm]'.")
WorkersOpt = typer.Option(None, "--workers", help="ray: workers (default: the cluster's GPUs, else 2); slurm: array "
                          "tasks (default: --max-parallel, else 8). Each measures a group of cells with its own "
                          "baseline.")
AddressOpt = typer.Option(None, "--address", help="ray: auto (a running cluster) or HOST:PORT (default: a running "
                          "cluster, else a new local one).")
GpusPerWorkerOpt = typer.Option(None, "--gpus-per-worker", help="ray, slurm: GPUs per worker (default 1).")
PartitionOpt = typer.Option(None, "--partition", help="slurm: the partition to submit to.")
TimeMinOpt = typer.Option(None, "--time-min", help="slurm: each task's time limit in minutes (default 240).")
MaxParallelOpt = typer.Option(None, "--max-parallel", help="slurm: array tasks running at once.")
DetachOpt = typer.Option(False, "--detach", help="slurm: submit and return; the same command again waits for the "
                         "tasks and collects (skipbench report shows what has finished).")
DeviceMapOpt = typer.Option(None, "--device-map", help="A model spread over devices: auto, balanced (even bytes), "
                            "sequential (fill each device in turn) or FILE.json (module name -> device, as "
                            "accelerate's device_map).")
DryRunOpt = typer.Option(False, "--dry-run", help="Load no weights: print the cells, each model's placement and "
                         "memory per device, and an estimate of the wall and compile time, with its basis.")
GpusOpt = typer.Option(None, "--gpus", help="Dry run: place on N GPUs of --gpu-memory instead of this machine's.")
GpuMemoryOpt = typer.Option("80GB", "--gpu-memory", help="Dry run: memory of each --gpus GPU (80GB, 24GiB).")
PeakBandwidthOpt = typer.Option(None, "--peak-bandwidth", help="Dry run: the target's memory bandwidth (B/s).")
PeakFlopsOpt = typer.Option(None, "--peak-flops", help="Dry run: the target's matmul peak (FLOP/s).")
AcceptanceOpt = typer.Option(None, "--acceptance", help="Dry run: assumed acceptance per draft token (default 0.6; "
                             "synthetic agree=A models accept all at exits >= A).")
