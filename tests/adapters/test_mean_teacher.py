"""Mean teacher and CoTTA as their official code does them: independently augmented student and teacher inputs (so
that the student gets a gradient), and CoTTA's output being its pseudo-label."""

from __future__ import annotations

import copy

import torch

from medtta.adapters.views import View, mean_probabilities
from medtta.engine import create_adapter


def test_one_mean_teacher_step_moves_the_student_by_its_learning_rate(trained_sources) -> None:
    """Student and teacher start equal: on the same input the consistency gradient is rounding (about 4e-9, below
    Adam's eps, so a step moves weights by a fraction of lr). Independent augmentations give a real gradient, and
    Adam's first step moves (nearly) every weight by about lr."""
    source = trained_sources("unet")
    adapter = create_adapter("mean-teacher", copy.deepcopy(source.model), source.record)
    batch = source.source_tests()[0].x
    torch.manual_seed(0)
    with torch.enable_grad():
        adapter.objective(batch)[0].backward()
    gradient = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in adapter.params]))
    assert gradient > 1e-4
    adapter.optimizer.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in adapter.params]
    torch.manual_seed(0)
    adapter.update(batch)
    moved = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(adapter.params, before, strict=True)])
    assert moved.median() > 0.9 * adapter.hparams["lr"]


def test_cotta_predicts_its_pseudo_label(trained_sources) -> None:
    """Where the source anchor is unsure the output is the teacher's softmax averaged over the views (the plain one
    included), where it is sure the teacher's plain prediction; a confidence threshold above 1 makes every pixel
    unsure, one of 0 every pixel sure."""
    source = trained_sources("unet")
    batch = source.source_tests()[1].x
    unsure = create_adapter("cotta", copy.deepcopy(source.model), source.record, confidence=1.01)
    views = [View(), *unsure.views[2]]
    with torch.no_grad():
        averaged = mean_probabilities(unsure.teacher, batch, views)
        plain = unsure.teacher(batch).softmax(1)
    assert (averaged.argmax(1) != plain.argmax(1)).any()  # the check can tell them apart
    assert torch.allclose(unsure.predict(batch).exp(), averaged, atol=1e-5)
    sure = create_adapter("cotta", copy.deepcopy(source.model), source.record, confidence=0.0)
    assert torch.allclose(sure.predict(batch).exp(), plain, atol=1e-5)
    torch.manual_seed(0)
    online = unsure(batch)  # continual: predicted (the pseudo-label), then updated
    assert torch.allclose(online.exp(), averaged, atol=1e-5)
