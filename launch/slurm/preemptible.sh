# Sourced by the sbatch scripts: run the training step so that a stopped job keeps its progress and a warned one
# comes back.
#
#   #SBATCH --signal=B:USR1@120   SLURM warns this batch shell 120 s before the time limit (or: scancel --batch
#                                 --signal=USR1 <job>); the warning is passed to every training process, which
#                                 checkpoint at their next optimizer step and exit 75; the job then requeues itself
#   #SBATCH --requeue             and, started again, continues from that checkpoint (train.py --resume auto)
#   #SBATCH --open-mode=append    one log across the attempts
#
# SIGTERM (plain scancel, the time limit itself, preemption by another job) reaches every process of the step from
# SLURM directly: the ranks checkpoint and exit 75 within KillWait, and the job ends without requeueing; sbatch it
# again, unchanged, to continue.
#
# run_preemptible SIGNAL CMD...: SIGNAL is what the training processes get for the warning: USR1 where they are
# srun's or mpirun's tasks, TERM through the deepspeed launcher (which dies on USR1 and passes TERM on).
run_preemptible() {
  local forward="$1" step rc warned=0
  shift
  "$@" &
  step=$!
  trap 'warned=1; echo "[slurm] warning signal: checkpointing at the next step"; kill -'"$forward"' "$step" 2>/dev/null || true' USR1
  trap 'kill -TERM "$step" 2>/dev/null || true' TERM
  set +e
  while :; do
    wait "$step"
    rc=$?
    if [[ $rc -gt 128 ]] && kill -0 "$step" 2>/dev/null; then continue; fi # a trapped signal interrupted the wait
    break
  done
  set -e
  trap - USR1 TERM
  if [[ $warned == 1 && $rc != 0 ]]; then
    echo "[slurm] step stopped (exit $rc) after the warning: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}

# training_args ARGS...: the user's train.py arguments, continued from the run's latest checkpoint when an earlier
# attempt of this job wrote one, into runs/slurm-<job id> (the same across requeues) unless --output_dir is given.
# The user's own --resume, coming later, wins.
training_args() {
  TRAIN_ARGS=(--resume auto)
  local arg
  for arg in "$@"; do [[ $arg == --output_dir || $arg == --output_dir=* ]] && { TRAIN_ARGS+=("$@"); return; }; done
  TRAIN_ARGS+=(--output_dir "runs/slurm-$SLURM_JOB_ID" "$@")
}
