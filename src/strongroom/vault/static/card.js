// Strongroom hosted card form. Runs only inside the vault's iframe: the card goes from here to the
// vault (same origin); the embedding page receives nothing but the payment method's id.
'use strict';

(function () {
  const form = document.getElementById('card-form');
  if (!form) {
    return;
  }
  const allowedOrigin = form.dataset.allowedOrigin;
  const clientSecret = new URLSearchParams(window.location.search).get('session') || '';
  const number = document.getElementById('card-number');
  const expiry = document.getElementById('card-expiry');
  const cvc = document.getElementById('card-cvc');
  const button = document.getElementById('card-submit');
  const errorBox = document.getElementById('card-error');
  const fieldByParam = { 'card[number]': number, 'card[exp_month]': expiry, 'card[exp_year]': expiry, 'card[cvc]': cvc };
  // One submission at a time: a double click must not store the card twice.
  let inFlight = false;

  function tell(message) {
    if (window.parent === window) {
      return; // opened on its own, not embedded: nobody to tell
    }
    // Never the wildcard target: only the origin the merchant's server named may hear from the form.
    window.parent.postMessage(message, allowedOrigin);
  }

  function showError(message, field) {
    errorBox.textContent = message;
    for (const input of [number, expiry, cvc]) {
      input.setAttribute('aria-invalid', input === field ? 'true' : 'false');
    }
  }

  function parseExpiry(text) {
    const match = /^\s*(\d{1,2})\s*\/?\s*(\d{2}|\d{4})\s*$/.exec(text);
    return match ? { month: match[1], year: match[2] } : null;
  }

  async function submit() {
    if (inFlight) {
      return;
    }
    showError('', null);
    const digits = number.value.replace(/[\s-]/g, '');
    if (digits === '') {
      showError('Your card number is incomplete.', number);
      return;
    }
    const exp = parseExpiry(expiry.value);
    if (exp === null) {
      showError("Your card's expiration date is incomplete.", expiry);
      return;
    }
    const body = new URLSearchParams();
    body.set('client_secret', clientSecret);
    body.set('card[number]', digits);
    body.set('card[exp_month]', exp.month);
    body.set('card[exp_year]', exp.year);
    if (cvc.value.trim() !== '') {
      body.set('card[cvc]', cvc.value.trim());
    }
    inFlight = true;
    button.disabled = true;
    try {
      const response = await fetch('/v1/elements/payment_methods', {
        method: 'POST',
        body: body,
        credentials: 'omit',
        cache: 'no-store',
        referrerPolicy: 'no-referrer',
      });
      const result = await response.json();
      if (!response.ok) {
        const error = result && result.error ? result.error : {};
        showError(error.message || 'Your card could not be saved. Please try again.', fieldByParam[error.param] || null);
        tell({ type: 'strongroom.error', code: error.code || null });
        return;
      }
      form.reset();
      tell({ type: 'strongroom.payment_method', id: result.id });
    } catch (err) {
      showError('A network error occurred. Please check your connection and try again.', null);
    } finally {
      inFlight = false;
      button.disabled = false;
    }
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    submit();
  });

  window.addEventListener('message', (event) => {
    // Commands only from the embedding page, and only when it is the allowed origin.
    if (event.origin !== allowedOrigin || event.source !== window.parent) {
      return;
    }
    const data = event.data;
    if (data && data.type === 'strongroom.submit') {
      submit();
    } else if (data && data.type === 'strongroom.clear') {
      form.reset();
      showError('', null);
    }
  });

  tell({ type: 'strongroom.ready' });
})();
