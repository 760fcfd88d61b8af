"""The model and agent: inference, learning signals, checkpoints."""
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from algos import algos_vae_multimodal as algos
from algos import hdf5_format
from algos import utils_multimodal as utils
from conftest import ENV, ROOT, write_dataset

SMALL = dict(obs_feature_dim=32, image_feature_dim=16, device="cpu")


def make_buffer(path, **kw):
    return utils.MultimodalReplayBuffer(hdf5_format.load_dataset(path, progress=False), train_test_split=0.8, seed=0, **kw)


@pytest.fixture
def lapo(tiny_dataset):
    torch.manual_seed(0)
    return algos.MultimodalLatent(replay_buffer=make_buffer(tiny_dataset), **SMALL)


def raw_observation(rng, n, shape=(16, 16), joint_dim=16):
    imgs = [rng.integers(0, 256, (n, *shape, 3), dtype=np.uint8) for _ in range(3)]
    return imgs, rng.normal(size=(n, joint_dim)).astype(np.float32)


def test_single_observation_matches_its_row_in_a_batch(lapo):
    lapo.train(5, 8)   # trained weights, so normalisation layers hold real statistics
    imgs, joint = raw_observation(np.random.default_rng(0), 6)
    batch_actions = lapo.select_action(*imgs, joint)
    assert batch_actions.shape == (6, 16) and batch_actions.dtype == np.float32
    for i in (0, 3, 5):
        single = lapo.select_action(imgs[0][i], imgs[1][i], imgs[2][i], joint[i])
        assert single.shape == (16,)
        np.testing.assert_allclose(single, batch_actions[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("relative", ["none", "all"])
def test_select_action_returns_raw_units(tmp_path, relative):
    """A decoder output of 0 (normalised) comes back as the mean action, or as the current
    joint plus the mean change when actions are learned relative to the joints."""
    joint = np.random.default_rng(0).normal(size=(60, 16)).astype(np.float32)
    path = write_dataset(tmp_path / "d.hdf5", override={"observations/joint": joint, "actions": joint + 0.1})
    buffer = make_buffer(path, relative_actions=relative)
    agent = algos.MultimodalLatent(replay_buffer=buffer, **SMALL)
    with torch.no_grad():
        last = agent.actor_vae_target.decoder[-1]
        last.weight.zero_()
        last.bias.zero_()
    imgs, obs_joint = raw_observation(np.random.default_rng(1), 1)
    action = agent.select_action(imgs[0][0], imgs[1][0], imgs[2][0], obs_joint[0])
    norm = buffer.normalization
    expected = norm.action_mean + (obs_joint[0] if relative == "all" else 0)
    np.testing.assert_allclose(action, expected, rtol=1e-5, atol=1e-5)
    if relative == "all":
        np.testing.assert_allclose(norm.action_mean, 0.1, atol=1e-5)


def test_select_action_rejects_wrong_inputs(lapo):
    imgs, joint = raw_observation(np.random.default_rng(0), 1, shape=(20, 16))
    with pytest.raises(ValueError, match="left_image: shape"):
        lapo.select_action(imgs[0][0], imgs[1][0], imgs[2][0], joint[0])
    imgs, joint = raw_observation(np.random.default_rng(0), 1, joint_dim=7)
    with pytest.raises(ValueError, match="joint: shape"):
        lapo.select_action(imgs[0][0], imgs[1][0], imgs[2][0], joint[0])


def test_train_returns_finite_mean_losses_and_counts_steps(lapo):
    out = lapo.train(6, 8)
    assert out["iterations"] == 6 and out["nonfinite"] is None and lapo.total_it == 6
    for name in lapo.loss_names:
        assert np.isfinite(out[name]), name
    assert 0 <= out["positive_advantage_frac"] <= 1


@pytest.mark.parametrize("algo, loss, ratio", [("lapo", "critic_loss", 0.5), ("bc", "bc_loss", 0.7)])
def test_loss_falls_on_a_fixed_tiny_dataset(tmp_path, algo, loss, ratio):
    joint = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    path = write_dataset(tmp_path / "d.hdf5", n_rows=64, episode_len=8, image_shape=(8, 8),
                         override={"observations/joint": joint, "actions": np.tanh(joint)})
    torch.manual_seed(0)
    lr = {"lapo": {"critic_lr": 1e-3}, "bc": {"vae_lr": 1e-3}}[algo]
    agent = algos.make_agent(algo=algo, replay_buffer=make_buffer(path), **lr, **SMALL)
    first = agent.train(20, 16)[loss]
    agent.train(100, 16)
    last = agent.train(20, 16)[loss]
    assert last < ratio * first, (first, last)


def test_encoder_gets_gradient_from_critic_and_cvae_but_not_actor(lapo):
    """The design in the module docstring: one place decides what trains the encoder."""
    batch = lapo.replay_buffer.sample(8)
    before = [p.detach().clone() for p in lapo.encoder.parameters()]
    lapo._train_step(batch)
    moved = sum(not torch.equal(a, b) for a, b in zip(before, lapo.encoder.parameters()))
    assert moved > 0.9 * len(before)
    # The real update's gradient at the shared feature does not depend on the latent actor:
    # scrambling the actor leaves it unchanged, so the actor's loss never reaches the encoder.
    with torch.no_grad():
        feature = lapo.encoder(batch.images, batch.joint)
        next_feature = lapo.encoder(batch.next_images, batch.next_joint)
    grads = []
    for scramble in (False, True):
        agent = copy.deepcopy(lapo)
        if scramble:
            with torch.no_grad():
                for p in agent.actor.parameters():
                    p.add_(torch.randn_like(p))
        leaf = feature.clone().requires_grad_()
        torch.manual_seed(0)
        agent._update_heads(leaf, next_feature, batch)
        grads.append(leaf.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_save_load_in_a_new_process_gives_identical_actions(lapo, tmp_path):
    lapo.train(3, 8)
    lapo.save("model_best", str(tmp_path))
    imgs, joint = raw_observation(np.random.default_rng(2), 3)
    np.savez(tmp_path / "obs.npz", l=imgs[0], r=imgs[1], g=imgs[2], j=joint)
    expected = lapo.select_action(*imgs, joint)
    code = f"""
import sys, numpy as np
sys.path.insert(0, {ROOT!r})
from algos import algos_vae_multimodal as algos
o = np.load({str(tmp_path / 'obs.npz')!r})
policy = algos.MultimodalLatent()
policy.load('model_best', {str(tmp_path)!r})
a = policy.select_action(o['l'], o['r'], o['g'], o['j'])
b = algos.MultimodalLatent.from_checkpoint({str(tmp_path / 'model_best.pth')!r}).select_action(
    o['l'][0], o['r'][0], o['g'][0], o['j'][0])
np.save({str(tmp_path / 'a.npy')!r}, a); np.save({str(tmp_path / 'b.npy')!r}, b)
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), expected)
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), expected[0], rtol=1e-5, atol=1e-6)


def test_load_restores_optimisers_targets_and_step(lapo, tmp_path):
    lapo.train(4, 8)
    lapo.save("model_4", str(tmp_path))
    other = algos.MultimodalLatent(**SMALL)
    other.load("model_4", str(tmp_path))
    assert other.total_it == 4
    for name, module in lapo._modules().items():
        for (k, a), b in zip(module.state_dict().items(), other._modules()[name].state_dict().values()):
            assert torch.equal(a, b), (name, k)
    assert other.critic_optimizer.state_dict()["state"][0]["step"] == 4


def test_from_checkpoint_refuses_the_wrong_algorithm(tiny_dataset, tmp_path):
    bc = algos.MultimodalBC(replay_buffer=make_buffer(tiny_dataset), **SMALL)
    path = bc.save("model_final", str(tmp_path))
    with pytest.raises(algos.CheckpointError, match="MultimodalBC.from_checkpoint"):
        algos.MultimodalLatent.from_checkpoint(path)
    assert isinstance(algos.MultimodalAgent.from_checkpoint(path), algos.MultimodalBC)


def test_checkpoint_with_unknown_settings_is_refused_by_name(lapo, tmp_path):
    path = lapo.save("model_final", str(tmp_path))
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["setting_from_the_future"] = 1.0
    torch.save(ckpt, path)
    with pytest.raises(algos.CheckpointError, match="setting_from_the_future"):
        algos.MultimodalAgent.from_checkpoint(path)
    with pytest.raises(algos.CheckpointError, match="setting_from_the_future"):
        lapo.load(path)


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    import torchvision
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), path)
    encoder = algos.ObservationEncoder(16, 16, 32, pretrained_weights=str(path))
    assert torch.equal(encoder.trunks[1].conv1.weight, reference.conv1.weight)
    assert torch.equal(encoder.trunks[0].layer1[0].bn1.weight, reference.layer1[0].bn1.weight)
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    with pytest.raises(algos.CheckpointError, match="not a torchvision ResNet18"):
        algos.ObservationEncoder(16, 16, 32, pretrained_weights=str(bad))


@pytest.mark.parametrize("size", [16, 32, 64])
def test_trunk_computes_torchvisions_resnet18_with_the_same_state_dict(size):
    """The trunk's one-pixel convolutions (the last stages at small images) are the same
    function as torchvision's: same state dict keys, outputs and gradients, so checkpoints and
    pretrained weights load either way and nothing a run learns depends on the shortcut."""
    torch.manual_seed(0)
    ours = algos.resnet18_trunk(16).to(memory_format=torch.channels_last)
    stock = algos.resnet18_trunk(16, one_pixel_convs=False).to(memory_format=torch.channels_last)
    assert list(ours.state_dict()) == list(stock.state_dict())
    stock.load_state_dict(ours.state_dict())
    assert any(isinstance(m, algos.OnePixelConv2d) for m in ours.modules())
    assert not any(isinstance(m, algos.OnePixelConv2d) for m in stock.modules())
    x = torch.randn(4, 3, size, size).contiguous(memory_format=torch.channels_last)
    out_ours, out_stock = ours(x), stock(x)
    torch.testing.assert_close(out_ours, out_stock, rtol=1e-5, atol=1e-5)
    grads_ours = torch.autograd.grad(out_ours.pow(2).sum(), list(ours.parameters()))
    grads_stock = torch.autograd.grad(out_stock.pow(2).sum(), list(stock.parameters()))
    for g_ours, g_stock in zip(grads_ours, grads_stock):   # equal up to float rounding, at each tensor's scale
        torch.testing.assert_close(g_ours, g_stock, rtol=1e-4, atol=1e-4 * g_stock.abs().max().item())


def test_a_checkpoint_written_before_a_setting_existed_loads_with_its_earlier_value(lapo, tmp_path, monkeypatch):
    """A setting added after the checkpoint format takes, in an older checkpoint that lacks
    it, the value it had before it existed (filter_band: 0, today 0.1); a missing bookkeeping
    setting takes today's default; a setting older than the format that is missing is refused
    by name."""
    lapo.save("model_1", str(tmp_path))
    path = tmp_path / "model_1.pth"
    ckpt = torch.load(path, weights_only=True)
    for name in ("image_shift", "filter_band", "keep_last", "data_mode"):
        del ckpt["config"][name]
    torch.save(ckpt, path)
    with pytest.raises(algos.CheckpointError, match="image_shift"):
        algos.MultimodalLatent.from_checkpoint(str(path), device="cpu")
    monkeypatch.setitem(algos.config_lib.SETTINGS_ADDED_SINCE_FORMAT, "image_shift", 0)
    config = algos.MultimodalLatent.from_checkpoint(str(path), device="cpu").config
    assert (config.image_shift, config.filter_band, config.keep_last, config.data_mode) == (0, 0.0, 1, "auto")


def test_a_checkpoint_of_a_setting_taken_out_loads_when_it_was_off_and_is_refused_by_name_when_on(lapo, tmp_path):
    """Settings whose measurements lost are taken out; checkpoints written while they
    existed still load when they were off, and say which setting it is when they were on."""
    lapo.save("model_1", str(tmp_path))
    path = tmp_path / "model_1.pth"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["encoder_bc_rows"] = 0
    torch.save(ckpt, path)
    assert algos.MultimodalLatent.from_checkpoint(str(path), device="cpu").config == lapo.config
    ckpt["config"]["encoder_bc_rows"] = 32
    torch.save(ckpt, path)
    with pytest.raises(algos.CheckpointError, match="encoder_bc_rows=32"):
        algos.MultimodalLatent.from_checkpoint(str(path), device="cpu")
    # a choice taken out of a setting that remains is refused by name too
    ckpt["config"]["encoder_bc_rows"] = 0
    ckpt["config"]["episode_judge"] = "thumbnail"
    torch.save(ckpt, path)
    with pytest.raises(algos.CheckpointError, match="episode_judge='thumbnail'"):
        algos.MultimodalLatent.from_checkpoint(str(path), device="cpu")


def test_a_checkpoint_of_another_format_is_refused_by_name(lapo, tmp_path):
    """No per-setting guesses for older checkpoints: one clear refusal naming the format."""
    lapo.train(2, 8)
    path = lapo.save("model_old", str(tmp_path))
    ckpt = torch.load(path, weights_only=True)
    ckpt["format"] = 1
    torch.save(ckpt, path)
    for load in (lambda: algos.MultimodalAgent.from_checkpoint(path), lambda: algos.MultimodalLatent(**SMALL).load(path)):
        with pytest.raises(algos.CheckpointError, match="checkpoint format 1.*reads format 2"):
            load()


def test_a_checkpoint_rebuilds_the_whole_config_it_was_trained_with(tiny_dataset, tmp_path):
    """from_checkpoint and load need nothing but the file: every setting, data ones included."""
    buffer = make_buffer(tiny_dataset, n_step=3, relative_actions="none", discount=0.9)
    agent = algos.MultimodalLatent(replay_buffer=buffer, weight_temperature=0.2, tau=0.05, **SMALL)
    assert (agent.config.n_step, agent.config.relative_actions, agent.config.discount) == (3, "none", 0.9)
    path = agent.save("model_1", str(tmp_path))
    for restored in (algos.MultimodalAgent.from_checkpoint(path), algos.MultimodalLatent(device="cpu")):
        restored.load(path)
        assert restored.config == agent.config
        assert (restored.config.weight_temperature, restored.config.tau, restored.config.discount) == (0.2, 0.05, 0.9)


def test_a_misspelt_setting_is_an_error_for_every_algorithm():
    for algo in ("lapo", "bc"):
        with pytest.raises(TypeError, match="weight_temprature"):
            algos.make_agent(algo=algo, weight_temprature=0.1, **SMALL)


def test_library_and_cli_share_one_default_for_every_setting():
    """The buffer, the agent and the CLI all take their defaults from TrainConfig."""
    from algos import config
    import main_multimodal
    args = vars(main_multimodal.build_parser().parse_args([]))
    defaults = config.TrainConfig()
    assert all(args[name] == getattr(defaults, name) for name in args)
    assert algos.MultimodalLatent(**SMALL).config.n_step == defaults.n_step == args["n_step"] == 100


@pytest.mark.parametrize("algo", ["lapo", "bc"])
def test_the_encoder_comes_to_rest_at_the_end_of_the_run_while_the_heads_still_learn(tiny_dataset, algo):
    """encoder_lr for the first (1 - encoder_lr_decay) of the run, then a half cosine to 0;
    the heads keep their rates. Without a run length the rate stays constant."""
    torch.manual_seed(0)
    agent = algos.make_agent(algo=algo, replay_buffer=make_buffer(tiny_dataset), encoder_lr=1e-3,
                             encoder_lr_decay=0.5, **SMALL)
    assert [agent.encoder_lr_at(step, 8) for step in (0, 4, 6, 8)] == pytest.approx([1e-3, 1e-3, 5e-4, 0.0])
    head_lrs = {name: opt.param_groups[0]["lr"] for name, opt in agent._optimizers().items() if name != "encoder"}
    agent.train(7, 8, run_steps=8)
    assert agent.encoder_optimizer.param_groups[0]["lr"] == pytest.approx(agent.encoder_lr_at(6, 8))
    encoder = [p.clone() for p in agent.encoder.parameters()]
    heads = {name: [p.clone() for p in module.parameters()] for name, module in agent._modules().items()
             if name in head_lrs}
    agent.train(1, 8, run_steps=7)   # a step at the end of its schedule: rate 0
    assert all(torch.equal(old, new) for old, new in zip(encoder, agent.encoder.parameters()))
    for name, before in heads.items():
        assert not all(torch.equal(old, new) for old, new in zip(before, agent._modules()[name].parameters())), name
    assert {name: opt.param_groups[0]["lr"] for name, opt in agent._optimizers().items()
            if name != "encoder"} == head_lrs
    agent.train(1, 8)   # no run length: the configured rate
    assert agent.encoder_optimizer.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="encoder_lr_decay"):
        algos.make_agent(algo=algo, encoder_lr_decay=1.5, **SMALL)


def test_the_policy_acts_through_the_polyak_averages_of_all_its_parts(tiny_dataset):
    """select_action runs the averaged encoder, latent actor and decoder together; the
    averaged encoder follows the online one at rate tau and never trains."""
    torch.manual_seed(0)
    lapo = algos.MultimodalLatent(replay_buffer=make_buffer(tiny_dataset), tau=0.3, **SMALL)
    before = [p.clone() for p in lapo.encoder_target.parameters()]
    lapo.train(1, 8)
    for old, online, averaged in zip(before, lapo.encoder.parameters(), lapo.encoder_target.parameters()):
        torch.testing.assert_close(averaged, old + 0.3 * (online - old))
        assert not averaged.requires_grad
    lapo.train(2, 8)
    imgs, joint = raw_observation(np.random.default_rng(5), 4)

    def deployed(agent, encoder, actor):
        """Raw actions of the target decoder on ``actor``'s latent of ``encoder``'s features."""
        images, normalized, raw_joint, _ = agent._to_batch(*imgs, joint)
        with torch.no_grad():
            feature = encoder(images, normalized)
            action = agent.actor_vae_target.decode(feature, actor(feature))
        return agent.normalization.unnormalize_action(action.numpy(), raw_joint)
    acted = lapo.select_action(*imgs, joint)
    np.testing.assert_allclose(acted, deployed(lapo, lapo.encoder_target, lapo.actor_target), rtol=1e-5, atol=1e-5)
    assert not np.allclose(acted, deployed(lapo, lapo.encoder, lapo.actor), atol=1e-3)
    online = algos.MultimodalLatent(replay_buffer=make_buffer(tiny_dataset, original_lapo=True), **SMALL)
    online.train(1, 8)
    assert "encoder_target" not in online._modules()
    np.testing.assert_allclose(online.select_action(*imgs, joint), deployed(online, online.encoder, online.actor),
                               rtol=1e-5, atol=1e-5)


def test_model_selection_metric_measures_the_held_out_episodes_the_filter_keeps(tmp_path, monkeypatch):
    """test_kept_action_mse (the rows of LAPO's offline criterion for policy_best) is the policy's action
    error on the held-out episodes the filter's rule keeps, judged into the filter's state;
    a judgement that would keep none of them leaves the set as it was, so that the criterion
    never switches to other episodes mid-run (before any judgement: every held-out one)."""
    data = write_dataset(tmp_path / "d.hdf5", n_rows=80, episode_len=10)
    lapo = algos.MultimodalLatent(replay_buffer=utils.MultimodalReplayBuffer(
        hdf5_format.load_dataset(data, progress=False), train_test_split=0.5, seed=0), **SMALL)
    buffer = lapo.replay_buffer
    first_rows = buffer.test_episode_first_rows
    assert len(first_rows) >= 2
    one_episode = int(buffer.episode_index[first_rows[0]])
    judge = lapo._judge

    def judged(advantage_of):   # the held-out episodes judged as given, by their order
        def _judge(rows, buffer=None):
            episode, _ = judge(rows, buffer)
            return episode, torch.tensor([advantage_of(i) for i in range(len(episode))])
        return _judge

    monkeypatch.setattr(lapo, "_judge", judged(lambda i: -1.0))
    everything = lapo.offline_metrics()   # nothing kept at the first judgement: every held-out episode
    assert everything["test_kept_row_frac"] == 1.0
    assert everything["test_kept_action_mse"] == pytest.approx(everything["test_action_mse"], rel=1e-5)
    monkeypatch.setattr(lapo, "_judge", judged(lambda i: 1.0 if i == 0 else -1.0))
    one = lapo.offline_metrics()
    rows = buffer.eval_rows
    in_episode = buffer.episode_index[rows] == one_episode
    assert one["test_kept_row_frac"] == pytest.approx(float(in_episode.float().mean()))
    batch = buffer.gather(rows[in_episode])
    with torch.no_grad():
        expected = (lapo._act(batch.images, batch.joint) - batch.action).pow(2).mean()
    assert one["test_kept_action_mse"] == pytest.approx(float(expected), rel=1e-4)
    # weighted as the CVAE weighs training rows: only kept episodes count (here one, whose
    # judgement puts every row at the weight's clip)
    assert one["test_weighted_action_mse"] == pytest.approx(one["test_kept_action_mse"], rel=1e-4)
    monkeypatch.setattr(lapo, "_judge", judged(lambda i: -1.0))
    still = lapo.offline_metrics()   # all judged poor now: the set stays the one episode
    assert still["test_kept_row_frac"] == one["test_kept_row_frac"]
    assert still["test_kept_action_mse"] == pytest.approx(one["test_kept_action_mse"], rel=1e-5)
    assert not lapo.episode_kept[torch.as_tensor(buffer.train_episode_ids)].logical_not().any()   # training's untouched


@pytest.mark.parametrize("setting", ["feature_dropout", "joint_noise"])
@pytest.mark.parametrize("algo", ["lapo", "bc"])
def test_training_regularisers_act_in_training_steps_only(tiny_dataset, algo, setting):
    """--feature_dropout and --joint_noise change what a training step learns; acting never
    drops features or jitters joints (the same observation always gets the same action)."""
    agents = {}
    for value in (0.0, 0.5):
        torch.manual_seed(0)
        agents[value] = algos.make_agent(algo=algo, replay_buffer=make_buffer(tiny_dataset), **{setting: value},
                                         **SMALL)
    for agent in agents.values():
        agent.train(2, 8)   # same initial weights, same batches: only the setting differs
    changed = [not torch.equal(a, b) for a, b in zip(agents[0.0].encoder.parameters(), agents[0.5].encoder.parameters())]
    assert any(changed)
    regularised = agents[0.5]
    imgs, joint = raw_observation(np.random.default_rng(3), 5)
    np.testing.assert_array_equal(regularised.select_action(*imgs, joint), regularised.select_action(*imgs, joint))


def test_with_value_folds_each_episode_is_judged_by_a_head_that_never_fitted_it(tiny_dataset):
    """Each V head fits only its own fold's episodes; the filter judges an episode with another
    fold's head, so a head's fit of an episode's own return cannot decide its judgement."""
    torch.manual_seed(0)
    agent = algos.MultimodalLatent(replay_buffer=make_buffer(tiny_dataset, n_step=1), episode_judge="critic",
                                   **SMALL)   # 2 folds by default
    last = agent.critic.v_net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.3, -0.2]))   # head 0: V = 0.3 everywhere, head 1: V = -0.2
    agent._refresh_episode_advantage(n_episodes=len(agent.replay_buffer.train_episode_first_rows))
    buffer = agent.replay_buffer
    batch = buffer.gather(buffer.train_episode_first_rows)
    other = torch.where(batch.episode % 2 == 0, -0.2, 0.3).unsqueeze(1)
    expected = ((batch.reward + batch.discount * other).clamp(agent.min_v, agent.max_v)
                - other.clamp(agent.min_v, agent.max_v))
    torch.testing.assert_close(agent.episode_advantage[batch.episode], expected.squeeze(1))
    # the value loss of a row reaches only its own fold's head
    agent.critic_optimizer.zero_grad()
    rows = buffer.train_rows[buffer.train_row_episode % 2 == 0][:8]
    fold0 = buffer.gather(rows)
    with torch.no_grad():
        feature = agent.encoder(fold0.images, fold0.joint)
    agent.critic.v(feature, agent._fold(fold0.episode)).sum().backward()
    assert last.weight.grad[0].abs().sum() > 0 and last.weight.grad[1].abs().sum() == 0
    # the original algorithm has one V, fitted on every episode
    original = algos.MultimodalLatent(replay_buffer=make_buffer(tiny_dataset, n_step=1, original_lapo=True),
                                      original_lapo=True, **SMALL)
    assert original.critic.v_net[-1].out_features == 1 and original._fold(fold0.episode) is None
