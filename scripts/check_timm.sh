#!/usr/bin/env bash
# The README's timm table: `fullgrad check` with random weights on one model per timm
# family (batch of two photo-like inputs, and each alone), at each model's default size.
# Output: scripts/check-timm-random.txt.  Needs: pip install -e ".[timm]"
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=(
  resnet18 resnetv2_18 nf_regnet_b0 eca_nfnet_l0 efficientnet_b0 mobilenetv3_small_050
  mobilenetv3_large_100 regnetx_002 regnety_002 convnext_atto vit_tiny_patch16_224
  deit_tiny_distilled_patch16_224 eva02_tiny_patch14_224 swin_tiny_patch4_window7_224
  maxvit_nano_rw_256 maxvit_rmlp_nano_rw_256 maxxvit_rmlp_nano_rw_256 maxxvitv2_nano_rw_256
  maxvit_tiny_tf_224 levit_128s coat_lite_tiny coat_tiny mobilevit_xxs mobilevitv2_050
  edgenext_xx_small efficientvit_b0 efficientvit_m0 caformer_s18 poolformer_s12
  poolformerv2_s12 fastvit_t8 convformer_s18 nextvit_small repvit_m0_9 ghostnet_050
  hrnet_w18_small cs3darknet_s densenet121 inception_v3 xcit_nano_12_p16_224 cait_xxs24_224
  beit_base_patch16_224 twins_svt_small pvt_v2_b0 davit_tiny focalnet_tiny_srf
  tiny_vit_5m_224 hiera_tiny_224
)
args=()
for m in "${MODELS[@]}"; do args+=(-m "timm/$m"); done
OMP_WAIT_POLICY=PASSIVE fullgrad check --weights random "${args[@]}" | tee scripts/check-timm-random.txt
