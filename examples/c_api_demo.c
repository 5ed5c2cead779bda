/* c_api_demo.c — the generated C library used from plain C, with no Python involved.
 *
 *   convdsl compile examples/lenet5.cnn -o build/         # writes build/Makefile too
 *   make -C build demo DEMO=../examples/c_api_demo.c      # builds build/lenet5_demo
 *   ./build/lenet5_demo [weights.npz]
 *
 * The same program runs on the library compiled for OpenCL (--backend opencl, linked with
 * -lOpenCL): lenet5_create then takes the device CONVDSL_OPENCL_DEVICE names, or the first.
 *
 * It creates LeNet-5 with the parameters drawn from seed 0 or, given a file written by
 * Model.save in Python, with those weights; then runs forward on two synthetic images,
 * backward with dL/dy = 1, one training step, and prints the logits, a gradient checksum
 * and the loss. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "lenet5.h"

#define BATCH 2

int main(int argc, char **argv)
{
    if (argc > 2) {
        fprintf(stderr, "usage: %s [weights.npz]\n", argv[0]);
        return 2;
    }
    lenet5_model *net = lenet5_create(0);
    if (!net) {
        fprintf(stderr, "could not create the model: %s\n", lenet5_last_error(NULL));
        return 1;
    }
    if (argc == 2) {
        if (lenet5_load_weights(net, argv[1]) != 0) {
            fprintf(stderr, "load_weights: %s\n", lenet5_last_error(net));
            lenet5_destroy(net);
            return 1;
        }
        fprintf(stderr, "weights: %s\n", argv[1]);
    }
    if (lenet5_prepare(net, BATCH, NULL) != 0) {
        fprintf(stderr, "prepare: %s\n", lenet5_last_error(net));
        return 1;
    }
    int64_t in_shape[8], out_shape[8];
    const int in_rank = lenet5_input_shape(net, 0, in_shape);
    const int out_rank = lenet5_output_shape(net, 0, out_shape);
    int64_t in_count = 1, out_count = 1;
    for (int i = 0; i < in_rank; i++) in_count *= in_shape[i];
    for (int i = 0; i < out_rank; i++) out_count *= out_shape[i];

    lenet5_real *x = malloc(sizeof *x * (size_t)in_count);
    lenet5_real *y = malloc(sizeof *y * (size_t)out_count);
    lenet5_real *dy = malloc(sizeof *dy * (size_t)out_count);
    lenet5_real *dx = malloc(sizeof *dx * (size_t)in_count);
    if (!x || !y || !dy || !dx) return 1;
    for (int64_t i = 0; i < in_count; i++) x[i] = (lenet5_real)sin(0.01 * (double)i);
    for (int64_t i = 0; i < out_count; i++) dy[i] = 1;

    const lenet5_real *inputs[] = {x};
    lenet5_real *outputs[] = {y};
    if (lenet5_forward(net, inputs, outputs) != 0) {
        fprintf(stderr, "forward: %s\n", lenet5_last_error(net));
        return 1;
    }
    printf("logits:");
    for (int64_t i = 0; i < out_count; i++) printf(" %.6f", (double)y[i]);
    printf("\n");

    const lenet5_real *output_grads[] = {dy};
    lenet5_real *input_grads[] = {dx};
    if (lenet5_backward(net, output_grads, input_grads) != 0) {
        fprintf(stderr, "backward: %s\n", lenet5_last_error(net));
        return 1;
    }
    double checksum = 0;
    for (int64_t i = 0; i < in_count; i++) checksum += dx[i];
    printf("input gradient sum: %.6f\n", checksum);
    printf("parameters: %d, first is %s\n", lenet5_num_params(), lenet5_param_name(0));

    /* One training step: plain SGD (lr 0.01), torch's defaults for everything else. Adam would be
     * lenet5_optimizer_defaults(lenet5_adam, 1e-3), with its own fields to change after. */
    int64_t labels[BATCH] = {3, 7};
    double loss = 0;
    const lenet5_optimizer sgd = lenet5_optimizer_defaults(lenet5_sgd, 0.01);
    if (lenet5_train_step(net, inputs, labels, &sgd, &loss) != 0) {
        fprintf(stderr, "train_step: %s\n", lenet5_last_error(net));
        return 1;
    }
    printf("loss: %.6f\n", loss);

    free(x); free(y); free(dy); free(dx);
    lenet5_destroy(net);
    return 0;
}
