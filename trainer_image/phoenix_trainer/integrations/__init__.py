"""Phoenix inside training frameworks that own their loop.

- ``phoenix_trainer.integrations.lightning``: a PyTorch Lightning callback (``phoenix-jobs[lightning]``).
- ``phoenix_trainer.integrations.transformers``: a Hugging Face ``TrainerCallback``
  (``phoenix-jobs[transformers]``).

Both map the framework's state onto ``phoenix_trainer.Session``; neither is imported here, so
``import phoenix_trainer`` never pulls in a framework (a unit test checks it).
"""
