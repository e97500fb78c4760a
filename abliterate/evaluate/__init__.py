"""Stage 4, evaluate: answer labels (labels), refusal rates and KL against a base model (model_eval), and the
streaming chat engine behind chat.py (chat_engine)."""
