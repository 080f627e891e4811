//! Image input for chat completions and responses: each image part's bytes (a `data:` URL or a
//! Files API file), decoded and checked, then encoded by the tier's vision encoder (off the
//! async threads, once per distinct image: encodings are cached by content), in prompt order.
//! `frontend::prepare` then splices their tokens into the prompt.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use ferrum_protocol::{image_marker, ApiError, ChatRequest, ImageDetail, ImageInput, ImageSource};
use ferrum_vision::{decode_image, Detail, EncodedImage, ImageLimits, VisionError, VisionModel};

use crate::models::Loaded;
use crate::{App, ServerError};

/// Images one request may carry.
pub const MAX_IMAGES: usize = 50;

/// Encoded images kept for reuse (a conversation sends its images again every turn).
const CACHE_IMAGES: usize = 64;

/// Encoded images by content key, least recently used evicted first.
#[derive(Default)]
pub struct ImageCache {
    inner: Mutex<Lru>,
}

/// The cached images and their keys from least to most recently used.
#[derive(Default)]
struct Lru(HashMap<[u8; 32], Arc<EncodedImage>>, VecDeque<[u8; 32]>);

impl ImageCache {
    fn get(&self, key: &[u8; 32]) -> Option<Arc<EncodedImage>> {
        let mut g = self.inner.lock().expect("image cache lock");
        let hit = g.0.get(key).cloned();
        if hit.is_some() {
            g.1.retain(|k| k != key);
            g.1.push_back(*key);
        }
        hit
    }

    fn put(&self, img: Arc<EncodedImage>) {
        let mut g = self.inner.lock().expect("image cache lock");
        if g.0.insert(img.key, Arc::clone(&img)).is_none() {
            g.1.push_back(img.key);
        }
        while g.1.len() > CACHE_IMAGES {
            if let Some(old) = g.1.pop_front() {
                g.0.remove(&old);
            }
        }
    }
}

/// The request's images in prompt order.
pub fn images_of(req: &ChatRequest) -> Vec<&ImageInput> {
    req.messages.iter().flat_map(|m| m.images.iter()).collect()
}

fn detail(d: ImageDetail) -> Detail {
    match d {
        ImageDetail::Low => Detail::Low,
        ImageDetail::High | ImageDetail::Original => Detail::High,
        ImageDetail::Auto => Detail::Auto,
    }
}

fn bad_image(img: &ImageInput, field: &str, code: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_param(format!("{}.{field}", img.param), code, message)
}

/// The field of an image part its source is in, for errors.
fn source_field(img: &ImageInput) -> &'static str {
    match img.source {
        // Chat's `{"image_url": {"url": ...}}`; the Responses API's `"image_url": "..."`.
        ImageSource::Url(_) if img.param.starts_with("messages") => "image_url.url",
        ImageSource::Url(_) => "image_url",
        ImageSource::FileId(_) => "file_id",
    }
}

/// The bytes of an image and the media type it claims (a data URL's), or a clear 400.
async fn image_bytes(
    app: &App,
    img: &ImageInput,
) -> Result<(Vec<u8>, Option<String>), ServerError> {
    let field = source_field(img);
    match &img.source {
        ImageSource::Url(url) => {
            if let Some(rest) = url.strip_prefix("data:") {
                let Some((head, data)) = rest.split_once(',') else {
                    return Err(bad_image(
                        img,
                        field,
                        "invalid_image_url",
                        "Invalid data URL: no ',' before the data.",
                    )
                    .into());
                };
                let Some(media) = head.strip_suffix(";base64") else {
                    return Err(bad_image(
                        img,
                        field,
                        "invalid_image_url",
                        "Invalid data URL: images must be base64 encoded ('data:image/png;base64,...').",
                    )
                    .into());
                };
                if !ferrum_vision::IMAGE_MEDIA_TYPES.contains(&media) && media != "image/jpg" {
                    return Err(bad_image(
                        img,
                        field,
                        "invalid_image_format",
                        format!(
                            "Invalid image media type '{media}': supported types are {}.",
                            ferrum_vision::IMAGE_MEDIA_TYPES.join(", ")
                        ),
                    )
                    .into());
                }
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data.trim())
                    .map_err(|e| {
                        bad_image(
                            img,
                            field,
                            "invalid_image_url",
                            format!("Invalid base64 image data: {e}."),
                        )
                    })?;
                Ok((bytes, Some(media.to_string())))
            } else if (url.starts_with("https://") || url.starts_with("http://"))
                && app.fetch_image_urls
            {
                let url = url.clone();
                tokio::task::spawn_blocking(move || download(&url))
                    .await
                    .map_err(|e| ServerError::internal("downloading an image", e))?
                    .map_err(|m| bad_image(img, field, "invalid_image_url", m).into())
            } else if url.starts_with("https://") || url.starts_with("http://") {
                Err(bad_image(
                    img,
                    field,
                    "invalid_image_url",
                    "This server does not download image URLs: send the image as a base64 data \
                     URL ('data:image/png;base64,...'), or upload it to the Files API with \
                     purpose 'vision' and pass its file_id.",
                )
                .into())
            } else {
                Err(bad_image(
                    img,
                    field,
                    "invalid_image_url",
                    "Invalid image URL: expected a base64 data URL ('data:image/png;base64,...').",
                )
                .into())
            }
        }
        ImageSource::FileId(id) => {
            let f = crate::files::find(app, id).await.map_err(|_| {
                bad_image(
                    img,
                    field,
                    "invalid_value",
                    format!("No such File object: {id}"),
                )
            })?;
            if f.purpose != "vision" && f.purpose != "user_data" {
                return Err(bad_image(
                    img,
                    field,
                    "invalid_value",
                    format!(
                        "The file {id} has purpose '{}'; images must be uploaded with purpose \
                         'vision' or 'user_data'.",
                        f.purpose
                    ),
                )
                .into());
            }
            let bytes = tokio::fs::read(app.blobs.path(&f.id))
                .await
                .map_err(ServerError::io("reading an image file"))?;
            Ok((bytes, None))
        }
    }
}

/// Seconds an image download may take.
const DOWNLOAD_TIMEOUT_S: u64 = 20;

/// Downloads an image URL (`--fetch-image-urls`): its bytes, and its media type when the
/// server names an image type; the message of a 400 otherwise.
fn download(url: &str) -> Result<(Vec<u8>, Option<String>), String> {
    use std::io::Read;
    let limit = ImageLimits::default().max_bytes;
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(DOWNLOAD_TIMEOUT_S))
        .build();
    let resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, _) => {
            format!("Error while downloading {url}: the server answered HTTP {code}.")
        }
        other => format!("Error while downloading {url}: {other}."),
    })?;
    let media = resp
        .header("content-type")
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|t| ferrum_vision::IMAGE_MEDIA_TYPES.contains(&t.as_str()));
    let mut bytes = Vec::new();
    resp.into_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("Error while downloading {url}: {e}."))?;
    if bytes.len() > limit {
        return Err(format!(
            "The image at {url} is over the limit of {limit} bytes."
        ));
    }
    Ok((bytes, media))
}

/// Checks, reads, decodes and encodes the request's images, in prompt order (none: empty).
pub async fn encode_images(
    app: &Arc<App>,
    loaded: &Loaded,
    req: &ChatRequest,
) -> Result<Vec<Arc<EncodedImage>>, ServerError> {
    let images = images_of(req);
    let Some(first) = images.first() else {
        return Ok(Vec::new());
    };
    let Some(vision) = loaded.vision.clone() else {
        let kind = if first.param.starts_with("input") {
            "input_image"
        } else {
            "image_url"
        };
        return Err(ApiError::invalid_param(
            format!("{}.type", first.param),
            "unsupported_value",
            format!(
                "Content parts of type '{kind}' are not supported by the model `{}`: it has no \
                 vision encoder (an operator gives a tier one with `mmproj`).",
                loaded.tier.id
            ),
        )
        .into());
    };
    if images.len() > MAX_IMAGES {
        return Err(ApiError::invalid_param(
            "messages",
            "invalid_value",
            format!(
                "Too many images in request: {}. Max is {MAX_IMAGES}.",
                images.len()
            ),
        )
        .into());
    }
    let markers: usize = req
        .messages
        .iter()
        .map(|m| m.content.matches(image_marker()).count())
        .sum();
    if markers != images.len() {
        return Err(ApiError::invalid_param(
            "messages",
            "invalid_value",
            format!(
                "Message text may not contain '{}' (this server's image marker).",
                image_marker()
            ),
        )
        .into());
    }
    let mut raw = Vec::with_capacity(images.len());
    for img in &images {
        raw.push(image_bytes(app, img).await?);
    }
    let inputs: Vec<ImageInput> = images.into_iter().cloned().collect();
    let app = Arc::clone(app);
    tokio::task::spawn_blocking(move || encode_all(&app.images, &vision, &inputs, raw))
        .await
        .map_err(|e| ServerError::internal("encoding images", e))?
}

fn encode_all(
    cache: &ImageCache,
    vision: &VisionModel,
    inputs: &[ImageInput],
    raw: Vec<(Vec<u8>, Option<String>)>,
) -> Result<Vec<Arc<EncodedImage>>, ServerError> {
    let mut out = Vec::with_capacity(inputs.len());
    for (img, (bytes, media)) in inputs.iter().zip(raw) {
        let field = source_field(img);
        let decoded =
            decode_image(&bytes, media.as_deref(), ImageLimits::default()).map_err(|e| {
                let code = match &e {
                    VisionError::ImageFormat(_) => "invalid_image_format",
                    _ => "invalid_image",
                };
                bad_image(img, field, code, format!("Invalid image: {e}"))
            })?;
        let d = detail(img.detail);
        let key = vision.key(&decoded, d);
        let encoded = match cache.get(&key) {
            Some(hit) => hit,
            None => {
                let started = std::time::Instant::now();
                let enc = Arc::new(vision.encode(&decoded, d).map_err(|e| match e {
                    VisionError::Image(m) => {
                        ServerError::from(bad_image(img, field, "invalid_image", m))
                    }
                    other => ServerError::internal("encoding an image", other),
                })?);
                tracing::debug!(
                    width = decoded.width,
                    height = decoded.height,
                    tokens = enc.image_tokens(),
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "image encoded"
                );
                cache.put(Arc::clone(&enc));
                enc
            }
        };
        out.push(encoded);
    }
    Ok(out)
}

/// ferrum against llama.cpp's mtmd (commit 0c1e57098) on tiny random-weight models: the
/// fixtures and llama.cpp's outputs are in `tests/data/vision` (see its README for how they were
/// made). Per case: every image chunk's embeddings within [`EMBD_TOLERANCE`], the prompt's
/// text tokens and image-token counts equal, and 16 greedy tokens equal.
#[cfg(test)]
mod parity {
    use std::ops::ControlFlow;
    use std::path::PathBuf;
    use std::sync::mpsc::channel;
    use std::sync::Arc;

    use ferrum_engine::{
        is_placeholder, EngineOptions, Event, GenerateParams, LoadOptions, LoadedModel,
        ModelHandle, Priority, Request, SamplingParams,
    };
    use ferrum_vision::{decode_image, Detail, ImageLimits, Piece, Precision, VisionModel};
    use serde_json::Value;

    /// Largest absolute difference allowed between an image token's values and llama.cpp's.
    /// ggml rounds K and V to f16 in its flash attention and sums matrix products in another
    /// order; the values are of order 1.
    const EMBD_TOLERANCE: f32 = 2e-2;

    /// A greedy step whose top-two logit margin (in llama.cpp's logits) is below this may go
    /// the other way, which ends the comparison: llama.cpp's own flash-attention-off run of these fixtures already picks
    /// other tokens at margins of 0.023 and 0.221 nats (its embeddings are 2e-3 to 5e-3 from
    /// the default run's, as ferrum's are), and every later token depends on that choice.
    const MIN_MARGIN: f64 = 0.25;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/vision")
    }

    fn greedy(
        model: LoadedModel,
        prompt: Vec<u32>,
        embeds: ferrum_engine::PromptEmbeds,
        n: usize,
    ) -> Vec<u32> {
        let handle = ModelHandle::spawn(model, EngineOptions::default()).expect("engine");
        let (tx, rx) = channel();
        let request = Request {
            prompt,
            params: GenerateParams {
                max_tokens: n,
                ignore_eos: true,
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                ..Default::default()
            },
            choices: 1,
            priority: Priority::Interactive,
            adapter: None,
            embeds: Some(Arc::new(embeds)),
            sink: Box::new(move |ev| {
                if tx.send(ev).is_err() {
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            }),
        };
        handle.submit(request).expect("submit");
        for ev in rx.iter() {
            match ev {
                Event::Error(e) => panic!("engine error: {e}"),
                Event::ChoiceDone { completion, .. } => return completion.tokens,
                Event::Token { .. } | Event::Started => {}
            }
        }
        panic!("the engine ended without a completion")
    }

    #[test]
    fn image_embeddings_prompts_and_greedy_tokens_match_llama_cpp() {
        let cases: Vec<Value> =
            serde_json::from_slice(&std::fs::read(dir().join("reference.json")).unwrap()).unwrap();
        let mut worst = 0f32;
        let mut compared = 0;
        for case in &cases {
            let name = case["name"].as_str().unwrap();
            let lm = dir().join(case["lm"].as_str().unwrap());
            let opts = LoadOptions {
                threads: Some(2),
                ..Default::default()
            };
            let model = LoadedModel::load(&lm, &opts).unwrap();
            let mmproj = dir().join(case["mmproj"].as_str().unwrap());
            let vision = VisionModel::load_with(&mmproj, Precision::Exact, 2).unwrap();
            let images: Vec<_> = case["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    let bytes = std::fs::read(dir().join(f.as_str().unwrap())).unwrap();
                    let img = decode_image(&bytes, None, ImageLimits::default()).unwrap();
                    Arc::new(vision.encode(&img, Detail::Auto).unwrap())
                })
                .collect();
            // The image chunks in prompt order, as llama.cpp lists them.
            let ours: Vec<&[f32]> = images
                .iter()
                .flat_map(|img| {
                    img.pieces.iter().filter_map(|p| match p {
                        Piece::Image(i) => Some(img.inputs[*i].as_slice()),
                        _ => None,
                    })
                })
                .collect();
            let chunks = case["chunks"].as_array().unwrap();
            let theirs: Vec<Vec<f32>> = chunks
                .iter()
                .filter(|c| c["type"] == "image")
                .map(|c| {
                    c["embd"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect();
            assert_eq!(ours.len(), theirs.len(), "{name}: image chunks");
            for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(a.len(), b.len(), "{name}: chunk {k} size");
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                worst = worst.max(err);
                assert!(
                    err <= EMBD_TOLERANCE,
                    "{name}: chunk {k}: max abs error {err}"
                );
            }
            // llama.cpp's marker, as this server's.
            let prompt = case["prompt"]
                .as_str()
                .unwrap()
                .replace("<__media__>", ferrum_protocol::image_marker());
            let prompt = prompt.as_str();
            let (tokens, embeds, image_tokens) =
                crate::frontend::splice_images(&model, prompt, &images).unwrap();
            let mut expected: Vec<Option<u32>> = Vec::new();
            for c in chunks {
                if c["type"] == "text" {
                    expected.extend(
                        c["tokens"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|t| Some(t.as_u64().unwrap() as u32)),
                    );
                } else {
                    expected.extend(std::iter::repeat_n(
                        None,
                        c["n_tokens"].as_u64().unwrap() as usize,
                    ));
                }
            }
            assert_eq!(tokens.len(), expected.len(), "{name}: prompt length");
            for (i, (t, e)) in tokens.iter().zip(&expected).enumerate() {
                match e {
                    Some(e) => assert_eq!(t, e, "{name}: prompt token {i}"),
                    None => assert!(is_placeholder(*t), "{name}: position {i} is an image token"),
                }
            }
            assert_eq!(
                image_tokens,
                expected.iter().filter(|e| e.is_none()).count()
            );
            let want: Vec<u32> = case["greedy"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect();
            // Random tiny models have near ties: ferrum must pick llama.cpp's token at every
            // step until one whose top-two margin (in llama.cpp's logits) is under MIN_MARGIN
            // goes the other way; the tokens after such a step depend on it.
            let margins: Vec<f64> = case["greedy_margin"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_f64().unwrap())
                .collect();
            let got = greedy(model, tokens, embeds, want.len());
            assert_eq!(got.len(), want.len(), "{name}: greedy length");
            let upto = match got.iter().zip(&want).position(|(a, b)| a != b) {
                None => want.len(),
                Some(i) => {
                    assert!(
                        margins[i] < MIN_MARGIN,
                        "{name}: greedy token {i} is {} where llama.cpp's is {} by a margin of {}",
                        got[i],
                        want[i],
                        margins[i]
                    );
                    i
                }
            };
            compared += upto;
        }
        eprintln!(
            "worst image-token error against llama.cpp: {worst}; {compared} greedy tokens equal"
        );
        assert!(
            compared >= 100,
            "too few greedy tokens compared: {compared}"
        );
    }
}
