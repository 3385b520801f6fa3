// Op schemas of the fastmlp library. Each backend registers its kernels in
// its own file (cpu/*.cpp, cuda/*); the Python side (fastmlp/ops.py) adds fake
// implementations and autograd.
#include <torch/library.h>

TORCH_LIBRARY(fastmlp, m) {
  // relu(x @ weight.T + bias) for x of shape (..., in_features).
  m.def("linear_relu(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Gradients of linear_relu from grad_y and the forward output y (whose
  // sign is the ReLU mask). output_mask = (grad_x, grad_weight, grad_bias)
  // says which to compute; an output not asked for is returned as an empty
  // tensor of shape (0,). weight is needed only for grad_x, x only for
  // grad_weight, so autograd saves no more than it must.
  m.def(
      "linear_relu_backward(Tensor grad_y, Tensor y, Tensor? x, "
      "Tensor? weight, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // A whole MLP: h = act(h @ weights[l].T + biases[l]) for every layer but
  // the last, act being `activation`, and y = out_act(z) for the last layer,
  // out_act being `output_activation` ("none" by default: no activation on
  // the output); x of shape (..., in_features), y (..., out_features of the
  // last layer). biases is empty (no biases) or holds one per layer.
  // Activations, as torch.nn.functional computes them: relu, leaky_relu
  // (with negative_slope), tanh, sigmoid, none, gelu (erf form), gelu_tanh
  // (approximate="tanh"), silu. Also returns `hidden`, what mlp_backward
  // reads, (rows, out_l) each: for every layer but the last its output
  // (relu, tanh, sigmoid, none, leaky_relu with negative_slope >= 0) or its
  // pre-activation (gelu, gelu_tanh, silu, leaky_relu with a negative
  // slope); with an output activation, one more: the last layer's
  // pre-activation. So len(hidden) = L - 1 + (output_activation != "none").
  m.def(
      "mlp(Tensor x, Tensor[] weights, Tensor[] biases, "
      "str activation='relu', str output_activation='none', "
      "float negative_slope=0.01) -> (Tensor, Tensor[])");
  // mlp's output alone, nothing saved: what fastmlp.mlp runs when no
  // gradient is recorded (torch.no_grad, torch.inference_mode). Not
  // differentiable (use mlp).
  m.def(
      "mlp_inference(Tensor x, Tensor[] weights, Tensor[] biases, "
      "str activation='relu', str output_activation='none', "
      "float negative_slope=0.01) -> Tensor");
  // Gradients of mlp from grad_y and what forward saved (hidden, and the
  // same activation arguments), in one call.
  // output_mask = (grad_x, grad of each weight, then of each bias when the
  // MLP has biases): 1 + L or 1 + 2L entries. Returns (grad_x, grad_weights,
  // grad_biases), the latter empty without biases; a gradient not asked for
  // is an empty tensor of shape (0,). x is needed only for weights[0]'s
  // gradient.
  m.def(
      "mlp_backward(Tensor grad_y, Tensor? x, Tensor[] weights, "
      "Tensor[] hidden, bool[] output_mask, str activation='relu', "
      "str output_activation='none', float negative_slope=0.01) "
      "-> (Tensor, Tensor[], Tensor[])");
  // One SGD training step of an MLP in place: forward (ReLU after every
  // layer but the last), mean softmax cross-entropy with label smoothing,
  // backward, and torch.optim.SGD's update (dampening 0) of the weights,
  // biases (empty list: none) and momentum buffers (one per parameter, in
  // parameter order, when momentum != 0; else empty). Returns the loss.
  // compute_dtype=bfloat16 with float32 parameters runs the GEMMs in bfloat16
  // (as torch.autocast would) and updates the float32 parameters. Their
  // bfloat16 copies are made for the call, or, when compute_copies lists one
  // per parameter (in parameter order), read from there and refreshed with
  // the updated values, saving the next step the cast.
  m.def(
      "mlp_sgd_step(Tensor x, Tensor target, Tensor(a!)[] weights, "
      "Tensor(b!)[] biases, Tensor(c!)[] momentum_buffers, "
      "Tensor(d!)[] compute_copies, float lr, "
      "float momentum, float weight_decay, bool nesterov, "
      "float label_smoothing, ScalarType? compute_dtype=None) -> Tensor");
  // The same step with torch.optim.Adam's update (decoupled_weight_decay:
  // AdamW's), bias correction included: exp_avgs and exp_avg_sqs (and, with
  // amsgrad, max_exp_avg_sqs; else empty) hold one state tensor per
  // parameter in parameter order, state_steps one 0-d float32/float64 CPU
  // step count per parameter, each incremented before its update as torch
  // does. compute_dtype and compute_copies as for mlp_sgd_step.
  m.def(
      "mlp_adamw_step(Tensor x, Tensor target, Tensor(a!)[] weights, "
      "Tensor(b!)[] biases, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, "
      "Tensor(g!)[] compute_copies, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled_weight_decay, "
      "bool amsgrad, float label_smoothing, "
      "ScalarType? compute_dtype=None) -> Tensor");
}
