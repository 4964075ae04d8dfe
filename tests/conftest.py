"""Tests run on 8 simulated CPU devices; the count must be set before jax is imported."""

import os

import pytest

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# End-to-end variants that take 15-250 s each on 2 cores, run with `-m slow` (and kept
# passing). Each has a faster sibling in the default suite that exercises the same code:
# one mesh of each equivalence test (fsdp_tensor), one resume, one multi-process run
# (fsdp), the run-directory refusals, one flow of each kind. Listed here rather than on
# each parametrised case so that the default suite's budget is read in one place.
SLOW = {
    "tests/test_cli.py::test_debug_mode_stops_at_the_first_non_finite_step",
    "tests/test_data_run.py::test_sample_needs_no_training_data",
    "tests/test_diffusion.py::test_image_samples_have_the_data_shape_and_range",
    "tests/test_dit.py::test_adaln_zero_starts_every_block_as_the_identity[sincos]",
    "tests/test_equivalence.py::test_same_losses_on_one_and_eight_devices[mesh0-data_parallel]",
    "tests/test_equivalence.py::test_same_losses_on_one_and_eight_devices[mesh1-fsdp]",
    "tests/test_eval.py::test_eval_of_a_glow_run_prints_bits_per_dim_and_writes_eval_json",
    "tests/test_flow.py::test_inverse_of_forward_is_the_identity[glow_rgb]",
    "tests/test_flow.py::test_inverse_of_forward_is_the_identity[realnvp_images]",
    "tests/test_flow.py::test_log_determinant_matches_the_jacobian[glow]",
    "tests/test_flow.py::test_log_determinant_matches_the_jacobian[glow_rgb]",
    "tests/test_flow.py::test_log_determinant_matches_the_jacobian[realnvp_images]",
    "tests/test_gan.py::test_resume_on_another_topology",
    "tests/test_gan.py::test_same_losses_on_one_and_eight_devices[data_parallel]",
    "tests/test_gan.py::test_same_losses_on_one_and_eight_devices[fsdp]",
    "tests/test_gan.py::test_stop_and_resume_is_bitwise_exact",
    "tests/test_gan.py::test_the_generator_is_what_samples_and_labels_pick_classes",
    "tests/test_guidance.py::test_one_batched_network_call_per_step",
    "tests/test_guidance.py::test_sample_label_and_guidance_from_the_command_line",
    "tests/test_launcher.py::test_bad_config_on_the_hosts_is_one_user_error",
    "tests/test_launcher.py::test_frozen_host_is_named_and_the_job_completes_bitwise[worker]",
    "tests/test_launcher.py::test_killed_host_restarts_from_checkpoint_bitwise[worker]",
    "tests/test_launcher.py::test_local_ray_is_loopback_only_and_nothing_answers_without_the_token",
    "tests/test_launcher.py::test_max_failures_exhausted_exits_with_the_cause",
    "tests/test_launcher.py::test_more_hosts_than_the_machine_is_a_clear_error_within_a_minute",
    "tests/test_launcher.py::test_startup_failure_shows_one_traceback_and_no_restart",
    "tests/test_launcher.py::test_two_hosts_train_like_one_process_with_four_devices",
    "tests/test_likelihood_train.py::test_glow_resume_after_its_data_init_is_bitwise_exact",
    "tests/test_likelihood_train.py::test_same_losses_on_one_and_eight_devices[data_parallel-autoregressive]",
    "tests/test_likelihood_train.py::test_same_losses_on_one_and_eight_devices[data_parallel-flow]",
    "tests/test_likelihood_train.py::test_same_losses_on_one_and_eight_devices[fsdp-autoregressive]",
    "tests/test_likelihood_train.py::test_same_losses_on_one_and_eight_devices[fsdp-flow]",
    "tests/test_likelihood_train.py::test_same_losses_on_one_and_eight_devices[fsdp_tensor-flow]",
    "tests/test_multiprocess.py::test_two_processes_finish_with_samples_and_match_one_process[tensor]",
    "tests/test_pairs.py::test_sharded_gradients_match_one_device[decoder]",
    "tests/test_pairs.py::test_sharded_gradients_match_one_device[discriminator]",
    "tests/test_pairs.py::test_sharded_gradients_match_one_device[grid_decoder]",
    "tests/test_precision.py::test_bf16_tracks_float32_and_keeps_float32_master_weights",
    "tests/test_quality.py::test_default_moons_beats_a_gaussian_mixture",
    "tests/test_quality.py::test_digits_unet_trains_and_writes_a_grid",
    "tests/test_remat.py::test_block_remat_lowers_the_compiled_step_memory",
    "tests/test_remat.py::test_block_remat_keeps_the_batch_split_under_fsdp",
    "tests/test_remat.py::test_remat_gives_the_same_loss_and_gradients[dit]",
    "tests/test_remat.py::test_remat_gives_the_same_loss_and_gradients[unet]",
    "tests/test_resume.py::test_sigkill_during_save_then_resume",
    "tests/test_resume.py::test_sigterm_saves_exits_preempted_and_resumes",
    "tests/test_run_dir.py::test_a_second_training_on_the_same_directory_is_refused",
    "tests/test_run_dir.py::test_a_sweep_in_the_default_run_directory_keeps_every_run",
    "tests/test_run_dir.py::test_an_allowed_change_is_recorded_beside_the_old_config",
    "tests/test_run_dir.py::test_ctrl_c_saves_and_the_resume_is_exact",
    "tests/test_run_dir.py::test_metrics_hold_each_step_once_after_a_resume",
    "tests/test_run_dir.py::test_sample_and_export_refuse_bad_outputs_before_any_work",
    "tests/test_run_dir.py::test_train_with_only_a_run_directory_resumes_its_saved_config",
    "tests/test_step.py::test_micro_batches_match_the_full_batch",
    "tests/test_train.py::test_data_init_is_saved_and_not_repeated_on_resume",
    "tests/test_vae.py::test_same_losses_on_one_and_eight_devices[data_parallel-vae]",
    "tests/test_vae.py::test_same_losses_on_one_and_eight_devices[data_parallel-vqvae]",
    "tests/test_vae.py::test_same_losses_on_one_and_eight_devices[fsdp-vae]",
    "tests/test_vae.py::test_same_losses_on_one_and_eight_devices[fsdp-vqvae]",
    "tests/test_vae.py::test_same_losses_on_one_and_eight_devices[fsdp_tensor-vae]",
    "tests/test_vae.py::test_sample_a_label",
    "tests/test_vae.py::test_vqvae_resume_is_bitwise_exact_and_writes_reconstructions",
}


@pytest.hookimpl(tryfirst=True)   # before `-m 'not slow'` deselects
def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.nodeid in SLOW:
      item.add_marker(pytest.mark.slow)
