//! OpenAI wire types (serde) and their validation into typed requests. No I/O.
//!
//! Requests are parsed from JSON into validated internal types (`parse, don't validate`): every
//! rejection is an [`ApiError`] naming the parameter at fault with OpenAI's error code. Responses
//! are plain serde structs with the spec's field names.
//!
//! The `async-openai` crate's types were considered: they are built for a client (builders,
//! lenient optional fields, no path-aware validation), so a server would still need its own
//! validation layer and error codes; keeping both sides here is smaller and exact.

pub mod chat;
pub mod embeddings;
pub mod error;
pub mod moderation;
pub mod reader;
pub mod response;
pub mod responses;

pub use chat::{
    image_marker, parse_chat_request, ChatRequest, ImageDetail, ImageInput, ImageSource, Message,
    ResponseFormat, Role, ServiceTier, Tool, ToolChoice,
};
pub use embeddings::{parse_embedding_request, EmbeddingInput, EmbeddingRequest, EncodingFormat};
pub use error::{ApiError, ErrorType};
