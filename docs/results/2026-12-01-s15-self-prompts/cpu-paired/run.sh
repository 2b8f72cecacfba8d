. /work/venv/bin/activate
cd /work/main
for s in 14 15; do
  /usr/bin/time -f "s$s %e s" python -m orthrus_train recipe=smollm2-135m model.path=/tmp/smol.gguf model.dtype=float32 run_dir=/tmp/pe/s$s stage=eval heads.init_from=/work/main/.stage/heads-s$s eval.num_prompts=64 eval.max_new_tokens=128 eval.batch_size=16 eval.lossless.enabled=false eval.hf_generate_reference=false eval.plots=false 'eval.temperatures=[0]' eval.ar_baseline=false > /tmp/pe/s$s.log 2>&1
done
echo done > /tmp/pe/DONE
