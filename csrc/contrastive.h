/*
 * contrastive.h -- contrastive decoding's scores (Li et al., "Contrastive decoding:
 * open-ended text generation as optimization", ACL 2023).
 *
 * An expert model and a smaller amateur see the same tokens. The next token is
 * chosen by
 *
 *     score(x) = log p_EXP(x) - log p_AMA(x)      for x in V_head
 *     V_head   = {x : p_EXP(x) >= alpha * max_w p_EXP(w)}   (adaptive plausibility)
 *
 * and -inf outside V_head, where p_AMA is the amateur's softmax at temperature
 * amateur_temperature (the paper's tau). Tokens of V_head with p_AMA(x) = 0 score +inf:
 * when there are any, they alone keep a score, log p_EXP(x), and every other is -inf. The constraint keeps the tokens the
 * expert finds plausible, so the amateur's low probabilities cannot promote
 * nonsense. Greedy decoding takes the argmax of the scores (the paper's
 * search); lmdecode also lets the sampling chain treat them as logits.
 */
#ifndef LMD_CONTRASTIVE_H
#define LMD_CONTRASTIVE_H

#include "lmdecode.h"

/*
 * scores (vocab,) from the raw expert and amateur logits (vocab,) of one position; alpha
 * in [0, 1], amateur_temperature > 0. scores may alias neither input. Errors
 * (LMD_ERR_INVALID_ARG): NaN or +inf logits (naming which and where), a row of -inf, or
 * parameters outside their domains. The token the expert ranks first always survives.
 */
/* LMD_ERR_INVALID_ARG unless alpha is in [0, 1] and amateur_temperature > 0 (finite). */
lmd_status lmd_contrastive_check(double alpha, double amateur_temperature, lmd_error *err);

lmd_status lmd_contrastive_scores(const float *expert_logits, const float *amateur_logits, int32_t vocab,
                                  double alpha, double amateur_temperature, float *scores, lmd_error *err);

#endif /* LMD_CONTRASTIVE_H */
